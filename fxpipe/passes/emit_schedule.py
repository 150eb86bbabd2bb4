"""Pipeline schedules as data: emit them, check them, count what they keep alive.

A `Schedule` is, per device, an ordered list of `Instr`s: compute (`F`, `B`) and
point-to-point messages (`SEND_ACT`/`RECV_ACT` carry a stage's outputs forward,
`SEND_GRAD`/`RECV_GRAD` carry the gradient of a stage's inputs backward). The runtime runs
exactly these lists, so everything here follows the runtime's channel semantics:

* messages go into keyed mailboxes, one per ordered device pair;
* SEND never blocks; RECV blocks until the matching SEND has run;
* SEND_ACT(s, mb) on device(s) matches RECV_ACT(s+1, mb) on device(s+1);
  SEND_GRAD(s, mb) on device(s) matches RECV_GRAD(s-1, mb) on device(s-1);
* FWD(s, mb) needs RECV_ACT(s, mb) earlier on its device (s > 0); BWD(s, mb) needs
  FWD(s, mb) and, for s < last, RECV_GRAD(s, mb) earlier; SEND_ACT follows its FWD and
  SEND_GRAD follows its BWD. The last stage's FWD also computes the loss when training.

`validate_schedule` proves a schedule complete, well-ordered and deadlock-free (it plays the
programs as coroutines under those semantics) before anything runs.

Example:
    >>> s = emit_schedule("1f1b", num_stages=2, num_microbatches=2)
    >>> [str(i) for i in s.programs[1]]  # doctest: +NORMALIZE_WHITESPACE
    ['RECV_ACT(s1,mb0<-d0)', 'F(s1,mb0)', 'B(s1,mb0)', 'SEND_GRAD(s1,mb0->d0)',
     'RECV_ACT(s1,mb1<-d0)', 'F(s1,mb1)', 'B(s1,mb1)', 'SEND_GRAD(s1,mb1->d0)']
    >>> validate_schedule(s); peak_inflight(s)
    (2, 1)
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Sequence

from fxpipe.errors import ScheduleError

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
SCHEDULE_KINDS: tuple[str, ...] = ("gpipe", "1f1b", "forward")

#: Version written by `Schedule.to_dict`; `from_dict` refuses any other.
SCHEDULE_FORMAT_VERSION = 1
_FORMAT_NAME = "fxpipe.schedule"


class Op(StrEnum):
    """What one instruction does."""

    FWD = "F"
    BWD = "B"
    SEND_ACT = "SEND_ACT"
    RECV_ACT = "RECV_ACT"
    SEND_GRAD = "SEND_GRAD"
    RECV_GRAD = "RECV_GRAD"


_COMPUTE = frozenset({Op.FWD, Op.BWD})
_SENDS = frozenset({Op.SEND_ACT, Op.SEND_GRAD})
_RECVS = frozenset({Op.RECV_ACT, Op.RECV_GRAD})
_BACKWARD_OPS = frozenset({Op.BWD, Op.SEND_GRAD, Op.RECV_GRAD})


def _is_int(v: Any) -> bool:
    # bool is an int subclass; True as a stage index is always a mistake.
    return isinstance(v, int) and not isinstance(v, bool)


def _index(v: Any) -> int | None:
    """`v` as a plain int if it is an integer (numpy ints included, bools not), else None."""
    if isinstance(v, bool):
        return None
    try:
        return operator.index(v)
    except TypeError:
        return None


@dataclass(frozen=True, slots=True)
class Instr:
    """One instruction of a device program.

    `peer` is the device on the other end of a SEND/RECV and -1 for compute.

    Example:
        >>> str(Instr(Op.SEND_ACT, 0, 3, peer=1)), str(Instr(Op.RECV_ACT, 1, 3, peer=0))
        ('SEND_ACT(s0,mb3->d1)', 'RECV_ACT(s1,mb3<-d0)')
    """

    op: Op
    stage: int
    mb: int
    peer: int = -1

    def __post_init__(self) -> None:
        try:
            op = Op(self.op)
        except ValueError:
            raise ScheduleError(
                f"instruction op {self.op!r} is unknown; use one of {[o.value for o in Op]}"
            ) from None
        object.__setattr__(self, "op", op)  # accept "F" as well as Op.FWD
        for name in ("stage", "mb", "peer"):
            v = getattr(self, name)
            iv = _index(v)
            if iv is None:
                raise ScheduleError(f"instruction {op.value}: {name} must be an int, got {v!r}")
            object.__setattr__(self, name, iv)  # numpy ints from a planner become plain ints
        if self.stage < 0 or self.mb < 0:
            raise ScheduleError(
                f"instruction {op.value}: stage and mb must be >= 0, got stage={self.stage}, mb={self.mb}"
            )
        if op in _COMPUTE and self.peer != -1:
            raise ScheduleError(f"instruction {op.value}(s{self.stage},mb{self.mb}): compute has no peer; leave peer=-1")
        if op not in _COMPUTE and self.peer < 0:
            raise ScheduleError(
                f"instruction {op.value}(s{self.stage},mb{self.mb}): a SEND/RECV needs peer >= 0 (the other device)"
            )

    def __str__(self) -> str:
        if self.op in _SENDS:
            return f"{self.op.value}(s{self.stage},mb{self.mb}->d{self.peer})"
        if self.op in _RECVS:
            return f"{self.op.value}(s{self.stage},mb{self.mb}<-d{self.peer})"
        return f"{self.op.value}(s{self.stage},mb{self.mb})"

    @staticmethod
    def parse(text: str) -> "Instr":
        """The inverse of `str()`: ``Instr.parse("F(s0,mb3)") == Instr(Op.FWD, 0, 3)``."""
        m = _INSTR_RE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ScheduleError(
                f"{text!r} is not an instruction; expected e.g. 'F(s0,mb3)', 'B(s1,mb0)', "
                "'SEND_ACT(s0,mb3->d1)' or 'RECV_GRAD(s0,mb3<-d1)'"
            )
        op, stage, mb, arrow, peer = m.groups()
        if (arrow is None) != (op in ("F", "B")) or (
            arrow is not None and (arrow == "->") != op.startswith("SEND")
        ):
            raise ScheduleError(f"{text!r}: F/B take no peer, SEND_* needs '->dN', RECV_* needs '<-dN'")
        return Instr(Op(op), int(stage), int(mb), int(peer) if peer is not None else -1)


_INSTR_RE = re.compile(
    r"^(F|B|SEND_ACT|RECV_ACT|SEND_GRAD|RECV_GRAD)\(s(\d+),mb(\d+)(?:(->|<-)d(\d+))?\)$"
)


@dataclass(frozen=True)
class Schedule:
    """Per-device instruction lists for one training (or inference) step.

    Attributes:
        kind: "gpipe", "1f1b", "forward" (inference: forwards only) or "custom".
        num_stages: p, the number of pipeline stages.
        num_microbatches: m.
        stage_device: stage -> device index; several stages may share a device.
        programs: per device, the ordered instructions it runs.
        train: whether the step runs backwards (False: forwards only).

    Construction checks only the shape (types, lengths, device indices); call
    `validate_schedule` to check the semantics.
    """

    kind: str
    num_stages: int
    num_microbatches: int
    stage_device: tuple[int, ...]
    programs: tuple[tuple[Instr, ...], ...]
    train: bool

    def __post_init__(self) -> None:
        if not isinstance(self.kind, str) or not self.kind:
            raise ScheduleError(f"schedule kind must be a non-empty string, got {self.kind!r}")
        for name in ("num_stages", "num_microbatches"):
            v = getattr(self, name)
            iv = _index(v)
            if iv is None or iv < 1:
                raise ScheduleError(f"schedule {name} must be an int >= 1, got {v!r}")
            object.__setattr__(self, name, iv)
        if not isinstance(self.train, bool):
            raise ScheduleError(f"schedule train must be True or False, got {self.train!r}")
        # Accept lists (convenient when building custom schedules) but store tuples so the
        # value stays hashable and immutable.
        try:
            programs = tuple(tuple(p) for p in self.programs)
        except TypeError:
            raise ScheduleError("schedule programs must be a sequence (per device) of instruction sequences") from None
        for d, prog in enumerate(programs):
            for i, ins in enumerate(prog):
                if not isinstance(ins, Instr):
                    raise ScheduleError(f"schedule programs[{d}][{i}] must be an Instr, got {ins!r}")
        object.__setattr__(self, "programs", programs)
        try:
            stage_device = tuple(self.stage_device)
        except TypeError:
            raise ScheduleError("schedule stage_device must be a sequence of device indices") from None
        if len(stage_device) != self.num_stages:
            raise ScheduleError(
                f"schedule stage_device has {len(stage_device)} entries for {self.num_stages} stages; "
                "give exactly one device index per stage"
            )
        for s, d in enumerate(stage_device):
            di = _index(d)
            if di is None or not 0 <= di < len(programs):
                raise ScheduleError(
                    f"schedule stage_device[{s}] = {d!r} is not a device index in 0..{len(programs) - 1} "
                    f"(there are {len(programs)} device programs)"
                )
        object.__setattr__(self, "stage_device", tuple(_index(d) for d in stage_device))

    @property
    def num_devices(self) -> int:
        """Number of device programs (devices)."""
        return len(self.programs)

    def listing(self) -> str:
        """Human-readable program text, one line per device."""
        return "\n".join(
            f"d{d}: " + " ".join(str(i) for i in prog) for d, prog in enumerate(self.programs)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-safe dict; `Schedule.from_dict(s.to_dict()) == s`.

        Instructions are stored in their text form (``"SEND_ACT(s0,mb3->d1)"``) so a saved
        schedule reads like the listing a user inspects.
        """
        return {
            "format": _FORMAT_NAME,
            "version": SCHEDULE_FORMAT_VERSION,
            "kind": self.kind,
            "num_stages": self.num_stages,
            "num_microbatches": self.num_microbatches,
            "stage_device": list(self.stage_device),
            "train": self.train,
            "programs": [[str(i) for i in prog] for prog in self.programs],
        }

    @staticmethod
    def from_dict(d: Any) -> "Schedule":
        """Rebuild a schedule from `to_dict` output; bad input raises ScheduleError naming the field."""
        if not isinstance(d, dict):
            raise ScheduleError(f"a schedule must be a dict (from Schedule.to_dict), got {type(d).__name__}")
        required = ("format", "version", "kind", "num_stages", "num_microbatches", "stage_device", "train", "programs")
        missing = [k for k in required if k not in d]
        if missing:
            raise ScheduleError(f"schedule dict is missing field(s) {missing}; was it written by Schedule.to_dict?")
        extra = sorted(str(k) for k in d if k not in required)
        if extra:
            raise ScheduleError(f"schedule dict has unknown field(s) {extra}; remove them")
        if d["format"] != _FORMAT_NAME:
            raise ScheduleError(f"schedule field 'format' is {d['format']!r}, expected {_FORMAT_NAME!r}")
        if d["version"] != SCHEDULE_FORMAT_VERSION or not _is_int(d["version"]):
            raise ScheduleError(
                f"schedule field 'version' is {d['version']!r}; this fxpipe reads version "
                f"{SCHEDULE_FORMAT_VERSION} only (re-emit the schedule with this version)"
            )
        for k in ("num_stages", "num_microbatches"):
            if not _is_int(d[k]):
                raise ScheduleError(f"schedule field {k!r} must be an int, got {d[k]!r}")
        if not isinstance(d["kind"], str):
            raise ScheduleError(f"schedule field 'kind' must be a string, got {d['kind']!r}")
        if not isinstance(d["train"], bool):
            raise ScheduleError(f"schedule field 'train' must be true or false, got {d['train']!r}")
        sd = d["stage_device"]
        if not isinstance(sd, list) or not all(_is_int(x) for x in sd):
            raise ScheduleError(f"schedule field 'stage_device' must be a list of ints, got {sd!r}")
        progs = d["programs"]
        if not isinstance(progs, list) or not all(isinstance(p, list) for p in progs):
            raise ScheduleError("schedule field 'programs' must be a list (per device) of lists of instruction strings")
        programs = []
        for dev, prog in enumerate(progs):
            out = []
            for i, text in enumerate(prog):
                try:
                    out.append(Instr.parse(text))
                except ScheduleError as e:
                    raise ScheduleError(f"schedule field 'programs[{dev}][{i}]': {e}") from None
            programs.append(tuple(out))
        return Schedule(
            kind=d["kind"],
            num_stages=d["num_stages"],
            num_microbatches=d["num_microbatches"],
            stage_device=tuple(sd),
            programs=tuple(programs),
            train=d["train"],
        )


# ---- emission -----------------------------------------------------------------------------


def _stage_orders(kind: str, p: int, m: int, train: bool) -> list[list[tuple[Op, int]]]:
    """Per stage, the order of its compute (op, mb); messages are added around them later."""
    orders: list[list[tuple[Op, int]]] = []
    for s in range(p):
        if not train or kind == "forward":
            orders.append([(Op.FWD, mb) for mb in range(m)])
        elif kind == "gpipe":
            orders.append([(Op.FWD, mb) for mb in range(m)] + [(Op.BWD, mb) for mb in range(m)])
        else:  # 1f1b, Megatron's PipeDream-Flush
            warmup = min(p - s - 1, m)
            order = [(Op.FWD, mb) for mb in range(warmup)]
            for i in range(m - warmup):
                order += [(Op.FWD, warmup + i), (Op.BWD, i)]
            order += [(Op.BWD, mb) for mb in range(m - warmup, m)]
            orders.append(order)
    return orders


def _merge_onto_devices(
    orders: list[list[tuple[Op, int]]], stage_device: tuple[int, ...], num_devices: int
) -> list[list[tuple[Op, int, int]]]:
    """Interleave the per-stage orders of stages that share a device.

    Plays the pipeline in unit ticks: each tick, every device runs at most one compute op
    whose inputs were produced in an earlier tick, choosing among the heads of its stages'
    orders (backward first to free memory, then the oldest microbatch). Keeping each stage's
    own order keeps its activation bound; only running ready ops keeps the result
    deadlock-free whenever the one-stage-per-device pipeline is (the message system is a
    Kahn network, so any schedule of ready ops completes). With one stage per device this is
    just the per-stage order.
    """
    p = len(orders)
    last = p - 1
    heads = [0] * p
    done_at: dict[tuple[Op, int, int], int] = {}
    stages_of: list[list[int]] = [[] for _ in range(num_devices)]
    for s, d in enumerate(stage_device):
        stages_of[d].append(s)
    out: list[list[tuple[Op, int, int]]] = [[] for _ in range(num_devices)]
    remaining = sum(len(o) for o in orders)
    tick = 0
    while remaining:
        ran = []
        for d in range(num_devices):
            best = None
            for s in stages_of[d]:
                if heads[s] == len(orders[s]):
                    continue
                op, mb = orders[s][heads[s]]
                if op is Op.FWD:
                    dep = (Op.FWD, s - 1, mb) if s > 0 else None
                else:
                    dep = (Op.BWD, s + 1, mb) if s < last else None
                if dep is not None and done_at.get(dep, tick) >= tick:
                    continue  # input not produced in an earlier tick
                key = (op is Op.FWD, mb, s)
                if best is None or key < best[0]:
                    best = (key, s, op, mb)
            if best is not None:
                _, s, op, mb = best
                ran.append((d, s, op, mb))
        if not ran:  # cannot happen for gpipe/1f1b orders; guard against future kinds
            raise ScheduleError("internal: emitted per-stage orders deadlock; report this as a bug")
        for d, s, op, mb in ran:
            heads[s] += 1
            done_at[(op, s, mb)] = tick
            out[d].append((op, s, mb))
            remaining -= 1
        tick += 1
    return out


def emit_schedule(
    kind: str,
    num_stages: int,
    num_microbatches: int,
    stage_device: Sequence[int] | None = None,
    train: bool = True,
) -> Schedule:
    """Build the per-device programs of a standard pipeline schedule.

    Kinds:
        "gpipe": per stage, all forwards (mb 0..m-1) then all backwards in the same
            ascending order (mb 0 first). Keeps m microbatches of activations per stage.
        "1f1b": Megatron's PipeDream-Flush. Stage s of p runs min(p-s-1, m) warmup
            forwards, then alternates one forward / one backward, then drains the remaining
            backwards; at most min(p-s, m) microbatches are alive on stage s.
        "forward": forwards only (inference); needs train=False.
    With train=False, "gpipe" and "1f1b" give the same forward-only programs and the
    schedule's kind is reported as "forward".

    RECVs are placed immediately before the compute that needs them and SENDs immediately
    after the compute that produces them, also between stages on one device (the runtime
    then hands the value over locally). Stages sharing a device are interleaved by
    `_merge_onto_devices`. The result is validated before it is returned.

    Example:
        >>> s = emit_schedule("gpipe", 2, 2)
        >>> [str(i) for i in s.programs[0]]  # doctest: +NORMALIZE_WHITESPACE
        ['F(s0,mb0)', 'SEND_ACT(s0,mb0->d1)', 'F(s0,mb1)', 'SEND_ACT(s0,mb1->d1)',
         'RECV_GRAD(s0,mb0<-d1)', 'B(s0,mb0)', 'RECV_GRAD(s0,mb1<-d1)', 'B(s0,mb1)']
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
        raise ScheduleError("kind 'forward' runs no backward; pass train=False, or use 'gpipe'/'1f1b' to train")
    if stage_device is None:
        sd = tuple(range(p))
    else:
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
    num_devices = max(sd) + 1
    last = p - 1

    orders = _stage_orders(kind, p, m, train)
    merged = _merge_onto_devices(orders, sd, num_devices)
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
            else:
                if s < last:
                    prog.append(Instr(Op.RECV_GRAD, s, mb, sd[s + 1]))
                prog.append(Instr(Op.BWD, s, mb))
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


# ---- validation ---------------------------------------------------------------------------


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


def _local_deps(ins: Instr, sd: tuple[int, ...], last: int) -> list[Instr]:
    """Instructions that must come earlier on the same device than `ins`."""
    s, mb = ins.stage, ins.mb
    if ins.op is Op.FWD:
        return [Instr(Op.RECV_ACT, s, mb, sd[s - 1])] if s > 0 else []
    if ins.op is Op.BWD:
        return [Instr(Op.FWD, s, mb)] + ([Instr(Op.RECV_GRAD, s, mb, sd[s + 1])] if s < last else [])
    if ins.op is Op.SEND_ACT:
        return [Instr(Op.FWD, s, mb)]
    if ins.op is Op.SEND_GRAD:
        return [Instr(Op.BWD, s, mb)]
    return []  # a RECV needs nothing local: it waits for its SEND


def validate_schedule(s: Schedule) -> None:
    """Raise ScheduleError unless `s` is complete, well-ordered, matched and deadlock-free.

    Checks, in this order, reporting the first offending instruction (device, position,
    text): stage/mb in range and instruction on the device owning its stage; no backward
    instructions when train=False; SEND/RECV direction and peer device; no duplicates;
    program-order dependencies; every SEND has its RECV and vice versa; every FWD (and BWD
    when training) is present; and finally the programs run to completion as coroutines
    (SEND never blocks, RECV waits for its SEND).
    """
    p, m, sd = s.num_stages, s.num_microbatches, s.stage_device
    last = p - 1
    seen: dict[tuple[Op, int, int], tuple[int, int]] = {}

    # 1. each instruction on its own
    for d, prog in enumerate(s.programs):
        for i, ins in enumerate(prog):
            w = _where(d, i, ins)
            if ins.stage >= p:
                raise ScheduleError(f"{w}: stage {ins.stage} does not exist; the schedule has stages 0..{last}")
            if ins.mb >= m:
                raise ScheduleError(f"{w}: microbatch {ins.mb} does not exist; the schedule has microbatches 0..{m - 1}")
            owner = sd[ins.stage]
            if owner != d:
                raise ScheduleError(
                    f"{w}: stage {ins.stage} runs on device {owner}, not device {d}; "
                    f"move the instruction into device {owner}'s program"
                )
            if not s.train and ins.op in _BACKWARD_OPS:
                raise ScheduleError(f"{w}: a forward-only schedule (train=False) has no backward; remove it or set train=True")
            if ins.op in (Op.SEND_ACT, Op.RECV_GRAD) and ins.stage == last:
                raise ScheduleError(f"{w}: the last stage ({last}) has no next stage to exchange {ins.op.value} with")
            if ins.op in (Op.RECV_ACT, Op.SEND_GRAD) and ins.stage == 0:
                raise ScheduleError(f"{w}: stage 0 has no previous stage to exchange {ins.op.value} with")
            if ins.op in _SENDS or ins.op in _RECVS:
                other = ins.stage + 1 if ins.op in (Op.SEND_ACT, Op.RECV_GRAD) else ins.stage - 1
                if ins.peer != sd[other]:
                    raise ScheduleError(
                        f"{w}: peer is device {ins.peer} but stage {other} (the other end) runs on device "
                        f"{sd[other]}; set peer={sd[other]}"
                    )
            key = (ins.op, ins.stage, ins.mb)
            if key in seen:
                d0, i0 = seen[key]
                raise ScheduleError(f"{w}: duplicate; the same instruction is already at device {d0}, position {i0}")
            seen[key] = (d, i)

    # 2. program-order dependencies on each device
    for d, prog in enumerate(s.programs):
        done: set[tuple[Op, int, int]] = set()
        for i, ins in enumerate(prog):
            for want in _local_deps(ins, sd, last):
                k = (want.op, want.stage, want.mb)
                if k not in done:
                    raise ScheduleError(
                        f"{_where(d, i, ins)}: needs {want} earlier on device {d}, "
                        + ("but it comes later; move it before" if k in seen else "but it is missing; add it before")
                    )
            done.add((ins.op, ins.stage, ins.mb))

    # 3. every SEND has its RECV and every RECV its SEND
    for d, prog in enumerate(s.programs):
        for i, ins in enumerate(prog):
            if ins.op in _COMPUTE:
                continue
            mate = _matching(ins, sd)
            if (mate.op, mate.stage, mate.mb) not in seen:
                raise ScheduleError(
                    f"{_where(d, i, ins)}: has no matching {mate} on device {sd[mate.stage]}; add it there"
                )

    # 4. completeness of compute (messages follow from 2 and 3)
    for st in range(p):
        for mb in range(m):
            for op in (Op.FWD, Op.BWD) if s.train else (Op.FWD,):
                if (op, st, mb) not in seen:
                    raise ScheduleError(
                        f"{Instr(op, st, mb)} is missing: device {sd[st]} (which owns stage {st}) never runs it; "
                        "add it to that device's program"
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
        raise ScheduleError(
            "deadlock: no device can advance; " + "; ".join(lines)
            + ". Reorder the programs so every RECV's SEND can run first"
        )


def peak_inflight(s: Schedule) -> tuple[int, ...]:
    """Per stage, the most microbatches whose FWD ran and whose BWD has not (activations alive).

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
            elif ins.op is Op.BWD:
                alive[ins.stage] -= 1
    return tuple(peak)
