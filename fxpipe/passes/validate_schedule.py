"""`validate_schedule`: prove a schedule complete, well-ordered, matched and deadlock-free.

It plays the programs as coroutines under the runtime's channel semantics (see
`schedule_ir`) before anything runs; hand-written schedules (`load_schedule`) and the
simulator go through it as well as the emitter. Separate from the emitter (`emit_schedule`)
because it checks any schedule, whoever wrote it.
"""

from __future__ import annotations

import weakref

from fxpipe.errors import ScheduleError
from fxpipe.passes.schedule_ir import _BACKWARD_OPS, _COMPUTE, _RECVS, _SENDS, Instr, Op, Schedule

__all__ = ["validate_schedule"]


def _where(d: int, i: int, ins: Instr) -> str:
    return f"device {d}, position {i}: {ins}"


def _msg_key(ins: Instr, d: int) -> tuple[str, int, int, int, int]:
    """Mailbox key (kind, src device, dst device, sending stage, mb) a SEND puts / a RECV takes."""
    if ins.op is Op.SEND_ACT:
        return ("ACT", d, ins.peer, ins.stage, ins.mb)
    if ins.op is Op.RECV_ACT:
        return ("ACT", ins.peer, d, ins.stage - 1, ins.mb)
    if ins.op is Op.SEND_GRAD:
        return ("GRAD", d, ins.peer, ins.stage, ins.mb)
    return ("GRAD", ins.peer, d, ins.stage + 1, ins.mb)  # RECV_GRAD


def _matching_key(ins: Instr) -> tuple[Op, int, int]:
    """(op, stage, mb) of `_matching(ins)`, without building the instruction."""
    s, mb = ins.stage, ins.mb
    if ins.op is Op.SEND_ACT:
        return (Op.RECV_ACT, s + 1, mb)
    if ins.op is Op.RECV_ACT:
        return (Op.SEND_ACT, s - 1, mb)
    if ins.op is Op.SEND_GRAD:
        return (Op.RECV_GRAD, s - 1, mb)
    return (Op.SEND_GRAD, s + 1, mb)


def _matching(ins: Instr, stage_device: tuple[int, ...]) -> Instr:
    """The instruction on the other device that pairs with a SEND/RECV."""
    s, mb = ins.stage, ins.mb
    if ins.op is Op.SEND_ACT:
        return Instr(Op.RECV_ACT, s + 1, mb, stage_device[s])
    if ins.op is Op.RECV_ACT:
        return Instr(Op.SEND_ACT, s - 1, mb, stage_device[s])
    if ins.op is Op.SEND_GRAD:
        return Instr(Op.RECV_GRAD, s - 1, mb, stage_device[s])
    return Instr(Op.SEND_GRAD, s + 1, mb, stage_device[s])


def _located(msg: str, device: int | None = None, position: int | None = None) -> ScheduleError:
    """A ScheduleError that also carries where it happened (`.device`, `.position`), so that
    callers such as `load_schedule` can point at the line of a file."""
    e = ScheduleError(msg)
    e.device = device  # type: ignore[attr-defined]
    e.position = position  # type: ignore[attr-defined]
    return e


def _local_deps(ins: Instr, sd: tuple[int, ...], last: int, split: bool = False) -> list[tuple[Op, int, int, int]]:
    """Instructions that must come earlier on the same device than `ins`, as (op, stage, mb,
    peer) (`Instr(*t)` for messages: validating a large schedule builds no Instr per check).

    `split`: whether (ins.stage, ins.mb) uses BI/BW rather than BWD.
    """
    s, mb = ins.stage, ins.mb
    if ins.op is Op.FWD:
        return [(Op.RECV_ACT, s, mb, sd[s - 1])] if s > 0 else []
    if ins.op is Op.BWD or ins.op is Op.BWD_INPUT:
        return [(Op.FWD, s, mb, -1)] + ([(Op.RECV_GRAD, s, mb, sd[s + 1])] if s < last else [])
    if ins.op is Op.BWD_WEIGHT:
        return [(Op.BWD_INPUT, s, mb, -1)]
    if ins.op is Op.SEND_ACT:
        return [(Op.FWD, s, mb, -1)]
    if ins.op is Op.SEND_GRAD:
        return [(Op.BWD_INPUT if split else Op.BWD, s, mb, -1)]
    return []  # a RECV needs nothing local: it waits for its SEND


def validate_schedule(s: Schedule) -> None:
    """Raise ScheduleError unless `s` is complete, well-ordered, matched and deadlock-free.

    Checks, in this order, reporting the first offending instruction (device, position,
    text): stage/mb in range and instruction on the device owning its stage; no backward
    instructions when train=False; SEND/RECV direction and peer device; no duplicates; each
    (stage, mb) uses one backward form (B, or BI and BW); program-order dependencies; every
    SEND has its RECV and vice versa; every FWD (and B, or BI and BW, when training) is
    present; and finally the programs run to completion as coroutines (SEND never blocks,
    RECV waits for its SEND).

    The error carries `.device` and `.position` (None where no single instruction is to
    blame, e.g. a missing one).

    A schedule is immutable, so one that passed is remembered (by identity, while it lives)
    and not checked again: planning simulates the same schedule once per candidate cut.
    """
    ref = _VALIDATED.get(id(s))
    if ref is not None and ref() is s:
        return
    _validate(s)
    _VALIDATED[id(s)] = weakref.ref(s, lambda _, k=id(s): _VALIDATED.pop(k, None))


# id -> weak reference of the schedules that passed `validate_schedule`
_VALIDATED: dict[int, weakref.ref] = {}


def _validate(s: Schedule) -> None:
    p, m, sd = s.num_stages, s.num_microbatches, s.stage_device
    last = p - 1
    seen: dict[tuple[Op, int, int], tuple[int, int]] = {}

    # 1. each instruction on its own
    for d, prog in enumerate(s.programs):
        for i, ins in enumerate(prog):
            if ins.stage >= p:
                raise _located(f"{_where(d, i, ins)}: stage {ins.stage} does not exist; the schedule has stages 0..{last}", d, i)
            if ins.mb >= m:
                raise _located(
                    f"{_where(d, i, ins)}: microbatch {ins.mb} does not exist; the schedule has microbatches 0..{m - 1}", d, i
                )
            owner = sd[ins.stage]
            if owner != d:
                raise _located(
                    f"{_where(d, i, ins)}: stage {ins.stage} runs on device {owner}, not device {d}; "
                    f"move the instruction into device {owner}'s program", d, i,
                )
            if not s.train and ins.op in _BACKWARD_OPS:
                raise _located(
                    f"{_where(d, i, ins)}: a forward-only schedule (train=False) has no backward; remove it or set train=True", d, i
                )
            if ins.op in (Op.SEND_ACT, Op.RECV_GRAD) and ins.stage == last:
                raise _located(
                    f"{_where(d, i, ins)}: the last stage ({last}) has no next stage to exchange {ins.op.value} with", d, i
                )
            if ins.op in (Op.RECV_ACT, Op.SEND_GRAD) and ins.stage == 0:
                raise _located(f"{_where(d, i, ins)}: stage 0 has no previous stage to exchange {ins.op.value} with", d, i)
            if ins.op in _SENDS or ins.op in _RECVS:
                other = ins.stage + 1 if ins.op in (Op.SEND_ACT, Op.RECV_GRAD) else ins.stage - 1
                if ins.peer != sd[other]:
                    raise _located(
                        f"{_where(d, i, ins)}: peer is device {ins.peer} but stage {other} (the other end) runs on device "
                        f"{sd[other]}; set peer={sd[other]}", d, i,
                    )
            key = (ins.op, ins.stage, ins.mb)
            if key in seen:
                d0, i0 = seen[key]
                raise _located(
                    f"{_where(d, i, ins)}: duplicate; the same instruction is already at device {d0}, position {i0}", d, i
                )
            seen[key] = (d, i)

    # 1b. one backward form per (stage, mb): B, or BI + BW
    split: set[tuple[int, int]] = set()
    for (op, st_, mb), (d, i) in seen.items():
        if op is Op.BWD_INPUT or op is Op.BWD_WEIGHT:
            split.add((st_, mb))
            if (Op.BWD, st_, mb) in seen:
                d0, i0 = seen[(Op.BWD, st_, mb)]
                raise _located(
                    f"{_where(d, i, s.programs[d][i])}: stage {st_}, microbatch {mb} already runs the whole "
                    f"backward {Instr(Op.BWD, st_, mb)} at device {d0}, position {i0}; use either B, or BI "
                    "then BW, not both", d, i,
                )

    # 2. program-order dependencies on each device
    for d, prog in enumerate(s.programs):
        done: set[tuple[Op, int, int]] = set()
        for i, ins in enumerate(prog):
            for want in _local_deps(ins, sd, last, (ins.stage, ins.mb) in split):
                k = want[:3]
                if k not in done:
                    raise _located(
                        f"{_where(d, i, ins)}: needs {Instr(*want)} earlier on device {d}, "
                        + ("but it comes later; move it before" if k in seen else "but it is missing; add it before"),
                        d, i,
                    )
            done.add((ins.op, ins.stage, ins.mb))

    # 3. every SEND has its RECV and every RECV its SEND
    for d, prog in enumerate(s.programs):
        for i, ins in enumerate(prog):
            if ins.op in _COMPUTE:
                continue
            if _matching_key(ins) not in seen:
                mate = _matching(ins, sd)
                raise _located(
                    f"{_where(d, i, ins)}: has no matching {mate} on device {sd[mate.stage]}; add it there", d, i
                )

    # 4. completeness of compute (messages follow from 2 and 3)
    for st_ in range(p):
        for mb in range(m):
            if s.train and (st_, mb) in split:
                need: tuple[Op, ...] = (Op.FWD, Op.BWD_INPUT, Op.BWD_WEIGHT)
            else:
                need = (Op.FWD, Op.BWD) if s.train else (Op.FWD,)
            for op in need:
                if (op, st_, mb) not in seen:
                    hint = (
                        f" (it runs {Instr(Op.BWD_INPUT, st_, mb)}: a split backward needs its BW after the BI)"
                        if op is Op.BWD_WEIGHT else ""
                    )
                    raise _located(
                        f"{Instr(op, st_, mb)} is missing: device {sd[st_]} (which owns stage {st_}) never runs it"
                        f"{hint}; add it to that device's program", sd[st_], None,
                    )

    # 5. no deadlock: play the programs as coroutines under the channel semantics
    _check_deadlock(s)


def _check_deadlock(s: Schedule) -> None:
    pcs = [0] * s.num_devices
    sent: set[tuple[str, int, int, int, int]] = set()
    waiting: dict[tuple[str, int, int, int, int], int] = {}  # mailbox key -> device blocked on it
    runnable = list(range(s.num_devices - 1, -1, -1))
    while runnable:
        d = runnable.pop()
        prog = s.programs[d]
        while pcs[d] < len(prog):
            ins = prog[pcs[d]]
            if ins.op in _SENDS:
                key = _msg_key(ins, d)
                sent.add(key)
                if key in waiting:
                    runnable.append(waiting.pop(key))
            elif ins.op in _RECVS:
                key = _msg_key(ins, d)
                if key not in sent:
                    waiting[key] = d
                    break
            pcs[d] += 1
    blocked = [d for d in range(s.num_devices) if pcs[d] < len(s.programs[d])]
    if blocked:
        lines = []
        for d in blocked:
            ins = s.programs[d][pcs[d]]
            lines.append(f"{_where(d, pcs[d], ins)} waits for {_matching(ins, s.stage_device)} on device {ins.peer}")
        raise _located(
            "deadlock: no device can advance; " + "; ".join(lines)
            + ". Reorder the programs so every RECV's SEND can run first",
            blocked[0], pcs[blocked[0]],
        )
