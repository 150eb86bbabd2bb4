"""The Schedule IR: `Op`, `Instr`, `Schedule` (and its versioned dict form).

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

Separate from the emitter (`emit_schedule`), the per-kind orders (`schedule_orders`) and the
checker (`validate_schedule`) because every one of them, the loader, the simulator and the
runtime read these types, while only the planner emits.
"""

from __future__ import annotations

import operator
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from fxpipe.errors import ScheduleError

__all__ = ["Op", "Instr", "Schedule", "SCHEDULE_FORMAT_VERSION"]

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
