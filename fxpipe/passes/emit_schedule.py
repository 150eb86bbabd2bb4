"""Pipeline schedules as data: emit them, check them, count what they keep alive.

A `Schedule` is, per device, an ordered list of `Instr`s (the IR and the runtime's channel
semantics it follows: `schedule_ir`). This module builds the standard schedules
(`emit_schedule`, from the per-kind orders in `schedule_orders`) and counts the microbatches
each stage keeps alive (`peak_inflight`); `validate_schedule` proves a schedule complete,
well-ordered and deadlock-free (it plays the programs as coroutines under those semantics)
before anything runs. The IR types and the checker are importable from here as before.

Example:
    >>> s = emit_schedule("1f1b", num_stages=2, num_microbatches=2)
    >>> [str(i) for i in s.programs[1]]  # doctest: +NORMALIZE_WHITESPACE
    ['RECV_ACT(s1,mb0<-d0)', 'F(s1,mb0)', 'B(s1,mb0)', 'SEND_GRAD(s1,mb0->d0)',
     'RECV_ACT(s1,mb1<-d0)', 'F(s1,mb1)', 'B(s1,mb1)', 'SEND_GRAD(s1,mb1->d0)']
    >>> validate_schedule(s); peak_inflight(s)
    (2, 1)
"""

from __future__ import annotations

from typing import Sequence

from fxpipe.errors import ScheduleError
from fxpipe.passes.schedule_ir import _FREES, SCHEDULE_FORMAT_VERSION, Instr, Op, Schedule, _index
from fxpipe.passes.schedule_orders import _interleaved_orders, _merge_onto_devices, _stage_orders
from fxpipe.passes.validate_schedule import validate_schedule

__all__ = [
    "Op",
    "Instr",
    "Schedule",
    "SCHEDULE_KINDS",
    "SCHEDULE_FORMAT_VERSION",
    "emit_schedule",
    "validate_schedule",
    "peak_inflight",
]

#: Kinds `emit_schedule` knows how to build.
SCHEDULE_KINDS: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zb-h1", "forward")



# ---- emission -----------------------------------------------------------------------------


def _placement(p: int, stage_device: Sequence[int] | None, num_devices: int | None) -> tuple[int, ...]:
    """Stage -> device from the arguments of `emit_schedule` (checked)."""
    if num_devices is not None:
        nd = _index(num_devices)
        if nd is None or nd < 1:
            raise ScheduleError(f"num_devices must be an int >= 1, got {num_devices!r}")
        if nd > p:
            raise ScheduleError(
                f"num_devices={nd} is more than num_stages={p}: devices {p}..{nd - 1} would hold no stage; "
                f"use num_devices <= {p} (or more stages)"
            )
    if stage_device is None:
        return tuple(range(p)) if num_devices is None else tuple(s % nd for s in range(p))
    raw = tuple(stage_device)
    if len(raw) != p:
        raise ScheduleError(
            f"stage_device has {len(raw)} entries for {p} stages; give one device index per stage "
            "(or None for stage s on device s)"
        )
    for s, d in enumerate(raw):
        di = _index(d)
        if di is None or di < 0:
            raise ScheduleError(f"stage_device[{s}] = {d!r} is not a device index (an int >= 0)")
    sd = tuple(_index(d) for d in raw)
    if num_devices is not None and max(sd) + 1 != nd:
        raise ScheduleError(
            f"num_devices={nd} but stage_device uses devices 0..{max(sd)}; give num_devices={max(sd) + 1} "
            "or leave one of the two out"
        )
    return sd


def _check_interleaved_placement(sd: tuple[int, ...]) -> tuple[int, int]:
    """(devices, virtual stages per device) of an interleaved placement, or ScheduleError."""
    p_all = len(sd)
    nd = max(sd) + 1
    fix = (
        f"pass num_devices=D (stage s on device s % D, D dividing {p_all}) or a stage_device "
        "where stage s runs on the same device as stage s % D and stages 0..D-1 are on D different devices"
    )
    if p_all % nd != 0:
        raise ScheduleError(
            f"interleaved: {p_all} stages on {nd} devices; every device needs the same number v of "
            f"virtual stages (num_stages = v * devices); {fix}"
        )
    if len(set(sd[:nd])) != nd or any(sd[s] != sd[s % nd] for s in range(p_all)):
        raise ScheduleError(f"interleaved: stage_device {list(sd)} is not a round-robin placement; {fix}")
    return nd, p_all // nd


def emit_schedule(
    kind: str,
    num_stages: int,
    num_microbatches: int,
    stage_device: Sequence[int] | None = None,
    train: bool = True,
    *,
    num_devices: int | None = None,
) -> Schedule:
    """Build the per-device programs of a standard pipeline schedule.

    Kinds:
        "gpipe": per stage, all forwards (mb 0..m-1) then all backwards in the same
            ascending order (mb 0 first). Keeps m microbatches of activations per stage.
        "1f1b": Megatron's PipeDream-Flush. Stage s of p runs min(p-s-1, m) warmup
            forwards, then alternates one forward / one backward, then drains the remaining
            backwards; at most min(p-s, m) microbatches are alive on stage s.
        "interleaved": Megatron's interleaved 1F1B (Narayanan et al., 2021). num_stages =
            v * D stages on D devices, stage s on device s % D (pass num_devices=D, or an
            equivalent stage_device); see `_interleaved_orders`. The bubble shrinks from
            (D-1)/(m+D-1) to (D-1)/(v*m+D-1) of the step for m a multiple of D (any m works;
            m < D or m % D != 0 just has more bubble). With one stage per device (v = 1,
            also the default placement) it is "1f1b".
        "zb-h1": Zero Bubble's ZB-H1 (Qi et al., 2024): 1F1B with every backward split into
            BI (input gradient) and BW (weight gradient), BW deferred into the bubbles; see
            `_zb_h1_order`. Peak in-flight microbatches per stage: min(p, m), the peak of
            1F1B's first stage.
        "forward": forwards only (inference); needs train=False.
    With train=False, every training kind gives the same forward-only programs and the
    schedule's kind is reported as "forward".

    Placement: stage_device[s] is stage s's device; without it, stage s runs on device
    s % num_devices when num_devices is given, else on device s.

    RECVs are placed immediately before the compute that needs them and SENDs immediately
    after the compute that produces them, also between stages on one device (the runtime
    then hands the value over locally). Stages sharing a device are interleaved by
    `_merge_onto_devices` (except for "interleaved", whose per-device order is Megatron's).
    The result is validated before it is returned.

    Example:
        >>> s = emit_schedule("gpipe", 2, 2)
        >>> [str(i) for i in s.programs[0]]  # doctest: +NORMALIZE_WHITESPACE
        ['F(s0,mb0)', 'SEND_ACT(s0,mb0->d1)', 'F(s0,mb1)', 'SEND_ACT(s0,mb1->d1)',
         'RECV_GRAD(s0,mb0<-d1)', 'B(s0,mb0)', 'RECV_GRAD(s0,mb1<-d1)', 'B(s0,mb1)']
        >>> s = emit_schedule("interleaved", 4, 2, num_devices=2)
        >>> s.stage_device, " ".join(str(i) for i in s.programs[0] if i.op is Op.FWD)
        ((0, 1, 0, 1), 'F(s0,mb0) F(s0,mb1) F(s2,mb0) F(s2,mb1)')
    """
    if kind not in SCHEDULE_KINDS:
        raise ScheduleError(f"unknown schedule kind {kind!r}; use one of {list(SCHEDULE_KINDS)}")
    p, m = _index(num_stages), _index(num_microbatches)
    if p is None or p < 1:
        raise ScheduleError(f"num_stages must be an int >= 1, got {num_stages!r}; a pipeline needs at least one stage")
    if m is None or m < 1:
        raise ScheduleError(
            f"num_microbatches must be an int >= 1, got {num_microbatches!r}; split the batch into at least one microbatch"
        )
    if not isinstance(train, bool):
        raise ScheduleError(f"train must be True or False, got {train!r}")
    if kind == "forward" and train:
        raise ScheduleError(
            "kind 'forward' runs no backward; pass train=False, or use 'gpipe'/'1f1b'/'interleaved'/'zb-h1' to train"
        )
    sd = _placement(p, stage_device, num_devices)
    nd = max(sd) + 1
    last = p - 1

    if kind == "interleaved" and train:
        d_il, v = _check_interleaved_placement(sd)
        if v == 1:
            merged = _merge_onto_devices(_stage_orders("1f1b", p, m, True), sd, nd)
        else:
            merged = [[] for _ in range(nd)]
            for r, ops in enumerate(_interleaved_orders(d_il, v, m)):
                merged[sd[r]] = ops
    else:
        merged = _merge_onto_devices(_stage_orders(kind, p, m, train), sd, nd)
    programs: list[tuple[Instr, ...]] = []
    for dev_ops in merged:
        prog: list[Instr] = []
        for op, s, mb in dev_ops:
            if op is Op.FWD:
                if s > 0:
                    prog.append(Instr(Op.RECV_ACT, s, mb, sd[s - 1]))
                prog.append(Instr(Op.FWD, s, mb))
                if s < last:
                    prog.append(Instr(Op.SEND_ACT, s, mb, sd[s + 1]))
            elif op is Op.BWD_WEIGHT:
                prog.append(Instr(Op.BWD_WEIGHT, s, mb))
            else:  # BWD or BWD_INPUT: consumes the output gradient, produces the input gradient
                if s < last:
                    prog.append(Instr(Op.RECV_GRAD, s, mb, sd[s + 1]))
                prog.append(Instr(op, s, mb))
                if s > 0:
                    prog.append(Instr(Op.SEND_GRAD, s, mb, sd[s - 1]))
        programs.append(tuple(prog))
    sched = Schedule(
        kind=kind if train else "forward",
        num_stages=p,
        num_microbatches=m,
        stage_device=sd,
        programs=tuple(programs),
        train=train,
    )
    validate_schedule(sched)  # cheap (linear) and turns an emitter bug into a clear error
    return sched


def peak_inflight(s: Schedule) -> tuple[int, ...]:
    """Per stage, the most microbatches whose FWD ran and whose BWD (or BW) has not ended
    (activations alive).

    Forward-only schedules keep one microbatch at a time per stage, so they report 1.
    Counts follow program order; run `validate_schedule` first for a meaningful answer.

    Example:
        >>> peak_inflight(emit_schedule("1f1b", 4, 8)), peak_inflight(emit_schedule("gpipe", 2, 3))
        ((4, 3, 2, 1), (3, 3))
    """
    if not s.train:
        return tuple(1 for _ in range(s.num_stages))
    alive = [0] * s.num_stages
    peak = [0] * s.num_stages
    for prog in s.programs:
        for ins in prog:
            if ins.op is Op.FWD:
                alive[ins.stage] += 1
                peak[ins.stage] = max(peak[ins.stage], alive[ins.stage])
            elif ins.op in _FREES:
                alive[ins.stage] -= 1
    return tuple(peak)
