"""Play a schedule against per-stage costs: a timeline, step time, bubbles, memory.

The model is the runtime's, with times attached:

* each device has one compute lane that runs its program in order; FWD/BWD take
  ``fwd_time[stage]`` / ``bwd_time[stage]`` seconds; the split backward of zero-bubble
  schedules, BI and BW, takes ``bwd_input_time[stage]`` / ``bwd_weight_time[stage]``
  (each ``bwd_time[stage] / 2`` unless given);
* a SEND starts a transfer on the link of its ordered device pair and the sender goes on
  at once; transfers on one link run one after another (in the sender's program order,
  the only device that uses that link in that direction); links are full duplex;
* a RECV waits until its message has arrived;
* moving stage s's boundary (its activations forward, or their gradient backward) takes
  ``comm_time[s]`` seconds; two stages on one device hand over in 0 seconds.

Every instruction gives one `Event`: FWD/BWD/BI/BW on lane "compute"; a SEND on lane
"comm" of the sending device, spanning the transfer; a RECV on lane "compute" spanning the
wait (zero length when the message was already there).

Memory (with ``activation_bytes``): a microbatch's activations of stage s,
``activation_bytes[s]`` bytes, are allocated on stage s's device when its FWD starts and
freed when its BWD (or BW) ends; forward-only schedules free them when the FWD ends.
`Timeline.memory` is that step function per device, `Timeline.peak_memory` its maximum.
With ``transient_bytes`` too, every BWD/BI/BW of stage s also holds ``transient_bytes[s]``
(the gradient buffers of one microbatch's backward) from its start to its end, and with
``kept_bytes`` a split backward keeps ``kept_bytes[s]`` (what BI leaves for BW) from its BI's
end to its BW's end: `Timeline.allocated` / `peak_allocated`, what an allocator sees above
the static state.

Example:
    >>> from fxpipe.passes.emit_schedule import emit_schedule
    >>> tl = simulate_schedule(emit_schedule("1f1b", 4, 8), [1.0] * 4, [2.0] * 4, [0.0] * 4)
    >>> tl.step_time, round(tl.bubble_fraction[0], 4)   # (m+p-1)(tf+tb), (p-1)/(m+p-1)
    (33.0, 0.2727)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from fxpipe.errors import ScheduleError
from fxpipe.passes.schedule_ir import Instr, Op, Schedule
from fxpipe.passes.validate_schedule import _msg_key, validate_schedule

__all__ = ["Event", "Timeline", "simulate_schedule"]

_COMPUTE_OPS = (Op.FWD, Op.BWD, Op.BWD_INPUT, Op.BWD_WEIGHT)
_CATEGORY = {Op.FWD: "forward", Op.BWD: "backward", Op.BWD_INPUT: "backward_input", Op.BWD_WEIGHT: "backward_weight"}


@dataclass(frozen=True, slots=True)
class Event:
    """One instruction placed in time (seconds from the start of the step)."""

    device: int
    instr: Instr
    start: float
    end: float
    lane: str  # "compute" or "comm"

    @property
    def duration(self) -> float:
        return self.end - self.start


@dataclass(frozen=True)
class Timeline:
    """What `simulate_schedule` predicts for one step.

    Attributes:
        events: every instruction of every device, in simulation order.
        step_time: seconds from the first instruction to the last one finishing.
        busy: per device, seconds spent in compute (FWD/BWD/BI/BW).
        bubble_fraction: per device, 1 - busy/step_time (0 when step_time is 0): the idle
            fraction of the step on that device.
        peak_inflight: per device, the most microbatches of activations alive at once,
            summed over the stages on that device (forward-only: 1 per device with work).
        memory: None unless simulated with ``activation_bytes``; else per device a step
            function of activation bytes over time: ``((t0, b0), (t1, b1), ...)`` means
            b_i bytes from t_i until t_{i+1} (and after the last point). Starts at
            (0.0, 0.0); one point per instant the value changes.
        peak_memory: None, or per device the largest value of its `memory`.
        allocated: None unless simulated with ``transient_bytes``; else like `memory` plus
            the backward's transient gradient buffers while a BWD/BI/BW runs.
        peak_allocated: None, or per device the largest value of `allocated` (compare with
            an allocator's peak above the memory held before the step).
    """

    events: tuple[Event, ...]
    step_time: float
    busy: tuple[float, ...]
    bubble_fraction: tuple[float, ...]
    peak_inflight: tuple[int, ...]
    memory: tuple[tuple[tuple[float, float], ...], ...] | None = None
    peak_memory: tuple[float, ...] | None = None
    allocated: tuple[tuple[tuple[float, float], ...], ...] | None = None
    peak_allocated: tuple[float, ...] | None = None

    @property
    def num_devices(self) -> int:
        return len(self.busy)

    def to_chrome_trace(self) -> dict[str, Any]:
        """A Chrome/Perfetto trace (load in chrome://tracing or ui.perfetto.dev).

        One process per device, thread 0 = compute, thread 1 = comm; times in microseconds.
        RECVs appear only when they actually waited, as "wait RECV_ACT s1 mb3 <- d0". With
        `memory`, each device also gets an "activation memory" counter track (bytes).
        """
        out: list[dict[str, Any]] = []
        for d in range(self.num_devices):
            out.append({"name": "process_name", "ph": "M", "pid": d, "tid": 0, "args": {"name": f"device {d}"}})
            out.append({"name": "process_sort_index", "ph": "M", "pid": d, "tid": 0, "args": {"sort_index": d}})
            out.append({"name": "thread_name", "ph": "M", "pid": d, "tid": 0, "args": {"name": "compute"}})
            out.append({"name": "thread_name", "ph": "M", "pid": d, "tid": 1, "args": {"name": "comm"}})
        for e in self.events:
            ins = e.instr
            if ins.op in _COMPUTE_OPS:
                name, cat = f"{ins.op.value} s{ins.stage} mb{ins.mb}", _CATEGORY[ins.op]
            elif ins.op in (Op.SEND_ACT, Op.SEND_GRAD):
                name, cat = f"{ins.op.value} s{ins.stage} mb{ins.mb} -> d{ins.peer}", "comm"
            else:
                if e.end <= e.start:
                    continue  # an instant RECV is noise in a trace
                name, cat = f"wait {ins.op.value} s{ins.stage} mb{ins.mb} <- d{ins.peer}", "wait"
            out.append(
                {
                    "name": name,
                    "cat": cat,
                    "ph": "X",
                    "pid": e.device,
                    "tid": 0 if e.lane == "compute" else 1,
                    "ts": e.start * 1e6,
                    "dur": (e.end - e.start) * 1e6,
                    "args": {"stage": ins.stage, "mb": ins.mb, "instr": str(ins)},
                }
            )
        if self.memory is not None:
            for d, steps in enumerate(self.memory):
                for t, b in steps:
                    out.append({"name": "activation memory", "ph": "C", "pid": d, "tid": 0, "ts": t * 1e6,
                                "args": {"bytes": b}})
        return {"traceEvents": out, "displayTimeUnit": "ms"}


def _costs(name: str, v: Sequence[float], lengths: tuple[int, ...], unit: str = "seconds") -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in v)
    except (TypeError, ValueError):
        raise ScheduleError(f"{name} must be a sequence of {unit} per stage, got {v!r}") from None
    if len(vals) not in lengths:
        raise ScheduleError(f"{name} has {len(vals)} entries; give one per stage ({lengths[0]})")
    for s, x in enumerate(vals):
        if not math.isfinite(x) or x < 0:
            what = "times" if unit == "seconds" else "sizes"
            raise ScheduleError(f"{name}[{s}] = {x!r}; {what} must be finite and >= 0 {unit}")
    return vals


def simulate_schedule(
    s: Schedule,
    fwd_time: Sequence[float],
    bwd_time: Sequence[float],
    comm_time: Sequence[float],
    *,
    bwd_input_time: Sequence[float] | None = None,
    bwd_weight_time: Sequence[float] | None = None,
    activation_bytes: Sequence[float] | None = None,
    transient_bytes: Sequence[float] | None = None,
    kept_bytes: Sequence[float] | None = None,
) -> Timeline:
    """Simulate one step of `s` (validated first; an invalid schedule raises ScheduleError).

    Args:
        fwd_time, bwd_time: seconds per microbatch for each stage (bwd_time: the whole
            backward, B).
        comm_time: comm_time[s] = seconds to move stage s's boundary to stage s+1's device
            (and its gradient back). p or p-1 entries; the last stage's entry is unused.
        bwd_input_time, bwd_weight_time: seconds of BI / BW per stage, for schedules that
            split the backward (zero-bubble); each defaults to bwd_time / 2.
        activation_bytes: bytes of activations one microbatch keeps alive on each stage;
            when given, the timeline carries `memory` and `peak_memory` per device.
        transient_bytes: bytes of gradient buffers one microbatch's backward of each stage
            holds while it runs (`CostTable.stage_transient`); with `activation_bytes`, the
            timeline also carries `allocated` and `peak_allocated`.
        kept_bytes: bytes of gradients a stage's BI keeps until its BW (`CostTable.stage_kept`),
            counted in `allocated`; 0 when not given.
    """
    validate_schedule(s)
    p = s.num_stages
    tf = _costs("fwd_time", fwd_time, (p,))
    tb = _costs("bwd_time", bwd_time, (p,))
    tc = _costs("comm_time", comm_time, (p, p - 1))
    tbi = tuple(x / 2 for x in tb) if bwd_input_time is None else _costs("bwd_input_time", bwd_input_time, (p,))
    tbw = tuple(x / 2 for x in tb) if bwd_weight_time is None else _costs("bwd_weight_time", bwd_weight_time, (p,))
    act = None if activation_bytes is None else _costs("activation_bytes", activation_bytes, (p,), unit="bytes")
    trans = None if transient_bytes is None else _costs("transient_bytes", transient_bytes, (p,), unit="bytes")
    kept = (0.0,) * p if kept_bytes is None else _costs("kept_bytes", kept_bytes, (p,), unit="bytes")
    duration = {Op.FWD: tf, Op.BWD: tb, Op.BWD_INPUT: tbi, Op.BWD_WEIGHT: tbw}
    D = s.num_devices

    clock = [0.0] * D  # when each compute lane is next free
    pcs = [0] * D
    link_free: dict[tuple[int, int], float] = {}
    arrival: dict[tuple[str, int, int, int, int], float] = {}
    waiting: dict[tuple[str, int, int, int, int], int] = {}
    events: list[Event] = []
    busy = [0.0] * D
    # Order of processing devices does not change any time: a device's times depend only on
    # its own program and message arrival times, and a link is used by one sender only.
    runnable = list(range(D - 1, -1, -1))
    while runnable:
        d = runnable.pop()
        prog = s.programs[d]
        while pcs[d] < len(prog):
            ins = prog[pcs[d]]
            t = clock[d]
            if ins.op in duration:
                dur = duration[ins.op][ins.stage]
                events.append(Event(d, ins, t, t + dur, "compute"))
                clock[d] = t + dur
                busy[d] += dur
            elif ins.op is Op.SEND_ACT or ins.op is Op.SEND_GRAD:
                boundary = ins.stage if ins.op is Op.SEND_ACT else ins.stage - 1
                if ins.peer == d:
                    start = end = t  # local hand-over
                else:
                    start = max(t, link_free.get((d, ins.peer), 0.0))
                    end = start + tc[boundary]
                    link_free[(d, ins.peer)] = end
                events.append(Event(d, ins, start, end, "comm"))
                key = _msg_key(ins, d)
                arrival[key] = end
                if key in waiting:
                    runnable.append(waiting.pop(key))
            else:  # RECV
                key = _msg_key(ins, d)
                if key not in arrival:
                    waiting[key] = d
                    break
                ready = max(t, arrival[key])
                events.append(Event(d, ins, t, ready, "compute"))
                clock[d] = ready
            pcs[d] += 1
    # validate_schedule proved deadlock freedom, so every program ran to its end.
    step = max((e.end for e in events), default=0.0)
    memory = None if act is None else _memory(s, events, act, step)
    allocated = None if act is None or trans is None else _memory(s, events, act, step, trans, kept)
    bubble = tuple((1.0 - b / step) if step > 0 else 0.0 for b in busy)
    return Timeline(
        events=tuple(events),
        step_time=step,
        busy=tuple(busy),
        bubble_fraction=bubble,
        peak_inflight=_device_peak_inflight(s),
        memory=memory,
        peak_memory=None if memory is None else tuple(max(b for _, b in steps) for steps in memory),
        allocated=allocated,
        peak_allocated=None if allocated is None else tuple(max(b for _, b in steps) for steps in allocated),
    )


def _memory(
    s: Schedule, events: list[Event], act: tuple[float, ...], step: float,
    transient: tuple[float, ...] | None = None, kept: tuple[float, ...] | None = None,
) -> tuple[tuple[tuple[float, float], ...], ...]:
    """Per device, activation bytes over time as a step function (see `Timeline.memory`);
    with `transient`, plus the running backward's gradient buffers and what each BI keeps
    for its BW (`kept`) (`Timeline.allocated`).

    Counts are kept per stage and the bytes recomputed from them at every change, so the
    value is exactly 0 once everything is freed (no float residue from +x-x). Changes less
    than 1e-9 of the step apart count as one instant (a BW ending and the next FWD starting
    at "the same" time, rounded differently, is no dip to zero).
    """
    tol = 1e-9 * step
    # (t, (what, stage), +1/-1): "act" activations, "run" a running backward's buffers,
    # "kept" the gradients a BI keeps for its BW
    changes: list[list[tuple[float, tuple[str, int], int]]] = [[] for _ in range(s.num_devices)]
    size = {("act", k): v for k, v in enumerate(act)}
    if transient is not None:
        size.update({("run", k): v for k, v in enumerate(transient)})
        size.update({("kept", k): v for k, v in enumerate(kept or (0.0,) * len(act))})
    for e in events:
        op, st, dev = e.instr.op, e.instr.stage, e.device
        if transient is not None and op in (Op.BWD, Op.BWD_INPUT, Op.BWD_WEIGHT) and e.end > e.start:
            # a zero-length backward holds its buffers for no time (instants merge)
            changes[dev] += [(e.start, ("run", st), 1), (e.end, ("run", st), -1)]
        if transient is not None and op in (Op.BWD_INPUT, Op.BWD_WEIGHT):
            changes[dev].append((e.end, ("kept", st), 1 if op is Op.BWD_INPUT else -1))
        if op is Op.FWD:
            changes[dev].append((e.start, ("act", st), 1))
            if not s.train:
                changes[dev].append((e.end, ("act", st), -1))
        elif op is Op.BWD or op is Op.BWD_WEIGHT:
            changes[dev].append((e.end, ("act", st), -1))
    out = []
    for ch in changes:
        ch.sort(key=lambda c: c[0])
        count: dict[tuple[str, int], int] = {}
        steps: list[tuple[float, float]] = [(0.0, 0.0)]
        t0 = None  # start of the current instant
        for i, (t, st, delta) in enumerate(ch):
            count[st] = count.get(st, 0) + delta
            t0 = t if t0 is None else t0
            if i + 1 < len(ch) and ch[i + 1][0] - t0 <= tol:
                continue  # one point per instant: the value after all changes in it
            b = float(sum(n * size[k] for k, n in count.items()))
            if t0 - steps[-1][0] <= tol:
                steps[-1] = (steps[-1][0], b)
            elif b != steps[-1][1]:
                steps.append((t0, b))
            t0 = None
        out.append(tuple(steps))
    return tuple(out)


def _device_peak_inflight(s: Schedule) -> tuple[int, ...]:
    """Per device: the most microbatch activations alive at once over all its stages."""
    out = []
    for prog in s.programs:
        if not s.train:
            out.append(1 if any(i.op is Op.FWD for i in prog) else 0)
            continue
        alive = peak = 0
        for ins in prog:
            if ins.op is Op.FWD:
                alive += 1
                peak = max(peak, alive)
            elif ins.op is Op.BWD or ins.op is Op.BWD_WEIGHT:
                alive -= 1
        out.append(peak)
    return tuple(out)
