"""Pipeline schedules as data: emit them, check them, count what they keep alive.

A `Schedule` is, per device, an ordered list of `Instr`s: compute (`F`, `B`, or the split
backward `BI` + `BW` of zero-bubble schedules) and point-to-point messages
(`SEND_ACT`/`RECV_ACT` carry a stage's outputs forward, `SEND_GRAD`/`RECV_GRAD` carry the
gradient of a stage's inputs backward). The runtime runs
exactly these lists, so everything here follows the runtime's channel semantics:

* messages go into keyed mailboxes, one per ordered device pair;
* SEND never blocks; RECV blocks until the matching SEND has run;
* SEND_ACT(s, mb) on device(s) matches RECV_ACT(s+1, mb) on device(s+1);
  SEND_GRAD(s, mb) on device(s) matches RECV_GRAD(s-1, mb) on device(s-1);
* FWD(s, mb) needs RECV_ACT(s, mb) earlier on its device (s > 0); BWD(s, mb) needs
  FWD(s, mb) and, for s < last, RECV_GRAD(s, mb) earlier; SEND_ACT follows its FWD and
  SEND_GRAD follows its BWD. The last stage's FWD also computes the loss when training.
* A (stage, mb) may instead split its backward in two (zero-bubble pipelines):
  BWD_INPUT ("BI", gradient w.r.t. the stage input: on the critical path, it produces
  SEND_GRAD's payload) then BWD_WEIGHT ("BW", gradient w.r.t. the stage's weights,
  deferrable). BI has BWD's dependencies, SEND_GRAD follows BI, BW follows BI. Each
  (stage, mb) uses exactly one form: BWD, or BI and BW. Its activations stay alive from
  FWD until BWD or BW ends.

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
import weakref
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
SCHEDULE_KINDS: tuple[str, ...] = ("gpipe", "1f1b", "interleaved", "zb-h1", "forward")

#: Version written by `Schedule.to_dict`; `from_dict` refuses any other.
SCHEDULE_FORMAT_VERSION = 1
_FORMAT_NAME = "fxpipe.schedule"


class Op(StrEnum):
    """What one instruction does."""

    FWD = "F"
    BWD = "B"
    BWD_INPUT = "BI"  # gradient w.r.t. the stage input (critical path; feeds SEND_GRAD)
    BWD_WEIGHT = "BW"  # gradient w.r.t. the stage weights (deferrable)
    SEND_ACT = "SEND_ACT"
    RECV_ACT = "RECV_ACT"
    SEND_GRAD = "SEND_GRAD"
    RECV_GRAD = "RECV_GRAD"


_COMPUTE = frozenset({Op.FWD, Op.BWD, Op.BWD_INPUT, Op.BWD_WEIGHT})
_SENDS = frozenset({Op.SEND_ACT, Op.SEND_GRAD})
_RECVS = frozenset({Op.RECV_ACT, Op.RECV_GRAD})
_BACKWARD_OPS = frozenset({Op.BWD, Op.BWD_INPUT, Op.BWD_WEIGHT, Op.SEND_GRAD, Op.RECV_GRAD})
#: Ops after which a microbatch's activations of a stage are freed (training).
_FREES = frozenset({Op.BWD, Op.BWD_WEIGHT})


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
                f"{text!r} is not an instruction; expected e.g. 'F(s0,mb3)', 'B(s1,mb0)', 'BI(s1,mb0)', "
                "'BW(s1,mb0)', 'SEND_ACT(s0,mb3->d1)' or 'RECV_GRAD(s0,mb3<-d1)'"
            )
        op, stage, mb, arrow, peer = m.groups()
        if (arrow is None) != (op in ("F", "B", "BI", "BW")) or (
            arrow is not None and (arrow == "->") != op.startswith("SEND")
        ):
            raise ScheduleError(f"{text!r}: F/B/BI/BW take no peer, SEND_* needs '->dN', RECV_* needs '<-dN'")
        return Instr(Op(op), int(stage), int(mb), int(peer) if peer is not None else -1)


_INSTR_RE = re.compile(
    r"^(F|BI|BW|B|SEND_ACT|RECV_ACT|SEND_GRAD|RECV_GRAD)\(s(\d+),mb(\d+)(?:(->|<-)d(\d+))?\)$"
)


@dataclass(frozen=True)
class Schedule:
    """Per-device instruction lists for one training (or inference) step.

    Attributes:
        kind: "gpipe", "1f1b", "interleaved", "zb-h1", "forward" (inference: forwards
            only) or "custom" (written by hand, e.g. loaded by `load_schedule`).
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


def _zb_h1_order(p: int, m: int, s: int) -> list[tuple[Op, int]]:
    """Stage s of ZB-H1 (Qi et al., 2024): 1F1B's order of F and BI, with BW deferred.

    Warmup and steady state are 1F1B's with every B replaced by BI. The BW of the oldest
    pending microbatch follows each BI from the (s+1)-th on, so stage s runs s BIs ahead of
    its BWs and the leftover s BWs fill the tail of the step (where 1F1B idles waiting for
    gradients). Every stage then holds min(p, m) microbatches at its peak: the peak of
    1F1B's first stage, which is the paper's memory bound (the peak over all workers is no
    more than 1F1B's; every worker keeps the same number in flight). A per-stage bound of
    p-s, as 1F1B has, cannot reach the third: the last stage would have to run F, BI, BW of
    one microbatch before the next F, leaving 2(p-1) T_F of bubble. With T_F = T_BI = T_BW
    the bubble is (p-1) T_F instead of 1F1B's 3(p-1) T_F: a third (for m >= p).
    """
    warmup = min(p - s - 1, m)
    order: list[tuple[Op, int]] = [(Op.FWD, mb) for mb in range(warmup)]
    n_bi = next_w = 0
    for i in range(m):
        if i < m - warmup:
            order.append((Op.FWD, warmup + i))
        order.append((Op.BWD_INPUT, i))
        n_bi += 1
        if n_bi > s:
            order.append((Op.BWD_WEIGHT, next_w))
            next_w += 1
    order += [(Op.BWD_WEIGHT, mb) for mb in range(next_w, m)]
    return order


def _stage_orders(kind: str, p: int, m: int, train: bool) -> list[list[tuple[Op, int]]]:
    """Per stage, the order of its compute (op, mb); messages are added around them later."""
    orders: list[list[tuple[Op, int]]] = []
    for s in range(p):
        if not train or kind == "forward":
            orders.append([(Op.FWD, mb) for mb in range(m)])
        elif kind == "gpipe":
            orders.append([(Op.FWD, mb) for mb in range(m)] + [(Op.BWD, mb) for mb in range(m)])
        elif kind == "zb-h1":
            orders.append(_zb_h1_order(p, m, s))
        else:  # 1f1b, Megatron's PipeDream-Flush (also interleaved with one stage per device)
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
    # the op that produces each stage's input gradient (BI in split-backward orders)
    grad_op = [Op.BWD_INPUT if any(op is Op.BWD_INPUT for op, _ in o) else Op.BWD for o in orders]
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
                elif op is Op.BWD_WEIGHT:
                    dep = None  # its BI is earlier in the same stage's order
                else:
                    dep = (grad_op[s + 1], s + 1, mb) if s < last else None
                if dep is not None and done_at.get(dep, tick) >= tick:
                    continue  # input not produced in an earlier tick
                key = (op is Op.FWD, mb, s)
                if best is None or key < best[0]:
                    best = (key, s, op, mb)
            if best is not None:
                _, s, op, mb = best
                ran.append((d, s, op, mb))
        if not ran:  # cannot happen for the emitted orders; guard against future kinds
            raise ScheduleError("internal: emitted per-stage orders deadlock; report this as a bug")
        for d, s, op, mb in ran:
            heads[s] += 1
            done_at[(op, s, mb)] = tick
            out[d].append((op, s, mb))
            remaining -= 1
        tick += 1
    return out


def _interleaved_orders(p: int, v: int, m: int) -> list[list[tuple[Op, int, int]]]:
    """Megatron's interleaved 1F1B: per rank r (0..p-1), its compute as (op, stage, mb).

    Rank r holds the v virtual stages c*p + r (c = 0..v-1, "model chunks"). Its m*v
    forwards run in the order of a table that takes the microbatches in groups of p and,
    per group, runs chunk 0 of the group, then chunk 1, ..., then chunk v-1. When p does
    not divide m the last group takes the leftovers (it holds p..2p-1 microbatches; all m
    when m < p), as Megatron-Core's schedule table does. Backwards follow the same table
    with the chunks reversed (chunk v-1 first). Rank r runs (p-r-1)*2 + (v-1)*g warmup
    forwards, g being the largest group (p when p divides m: Megatron's count), or all of
    them when m == p or when that exceeds m*v; then it alternates one forward, one
    backward; then it drains the remaining backwards.
    """
    n_groups = max(1, m // p)
    groups = [(g * p, m if g == n_groups - 1 else (g + 1) * p) for g in range(n_groups)]
    g_max = max(stop - start for start, stop in groups)
    table: list[tuple[int, int]] = []  # virtual index k -> (mb, chunk)
    for start, stop in groups:
        for c in range(v):
            table += [(mb, c) for mb in range(start, stop)]
    total = m * v
    out: list[list[tuple[Op, int, int]]] = []
    for r in range(p):
        warm = total if m == p else min((p - r - 1) * 2 + (v - 1) * g_max, total)
        fwd = [(Op.FWD, c * p + r, mb) for mb, c in table]
        bwd = [(Op.BWD, (v - 1 - c) * p + r, mb) for mb, c in table]
        ops = fwd[:warm]
        for k in range(total - warm):
            ops += [fwd[warm + k], bwd[k]]
        ops += bwd[total - warm :]
        out.append(ops)
    return out


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
