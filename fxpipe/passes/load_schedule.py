"""Load a schedule a user wrote by hand (JSON or CSV), check it, and say where it is wrong.

Formats (chosen by the file's extension, ``.json`` or ``.csv``):

* JSON, `Schedule.to_dict` form (what ``emit_schedule(...).to_dict()`` writes): loaded as
  is, kind included.
* JSON, short form (kind "custom")::

      {"stage_device": [0, 1], "num_microbatches": 2,
       "programs": [["F(s0,mb0)", "F(s0,mb1)", "B(s0,mb0)", "B(s0,mb1)"],
                    ["F(s1,mb0)", "B(s1,mb0)", "F(s1,mb1)", "B(s1,mb1)"]]}

  optional: "num_stages" (default len(stage_device)), "train" (default: whether any
  backward instruction appears), "kind" (default "custom").
* CSV (kind "custom"): rows ``device,instr1,instr2,...`` (instructions may be quoted but
  need not be: commas inside an instruction's parentheses do not split cells); a device
  may appear on several
  rows, whose instructions are appended in order, so one instruction per row
  (``device,instruction``) works too. Devices are written ``0`` or ``d0``. Blank lines and
  lines starting with ``#`` are skipped, and so is a header row whose first cell is not a
  device (e.g. ``device,instruction``). The stages, microbatches and placement are read off
  the instructions: stage s belongs to the device whose row holds it.

In either short form, a program may list compute only (F, B, BI, BW): when the file holds no
SEND/RECV at all, the messages are added the way `emit_schedule` adds them (each RECV just
before the compute that needs it, each SEND just after the compute that produces it). A file
with any SEND/RECV is taken literally.

The result is validated (`validate_schedule`); every error names the file, and the line and
instruction where one is to blame, e.g. ``sched.csv:4: instruction 'BW(s1,mb0)': ...``.

Example:
    >>> import json, tempfile, os
    >>> text = json.dumps({"stage_device": [0, 1], "num_microbatches": 1,
    ...                    "programs": [["F(s0,mb0)", "B(s0,mb0)"], ["F(s1,mb0)", "B(s1,mb0)"]]})
    >>> with tempfile.TemporaryDirectory() as tmp:
    ...     path = os.path.join(tmp, "s.json")
    ...     _ = open(path, "w").write(text)
    ...     print(load_schedule(path).listing())
    d0: F(s0,mb0) SEND_ACT(s0,mb0->d1) RECV_GRAD(s0,mb0<-d1) B(s0,mb0)
    d1: RECV_ACT(s1,mb0<-d0) F(s1,mb0) B(s1,mb0) SEND_GRAD(s1,mb0->d0)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fxpipe.errors import ScheduleError
from fxpipe.passes.schedule_ir import _COMPUTE, Instr, Op, Schedule, _is_int
from fxpipe.passes.validate_schedule import validate_schedule

__all__ = ["load_schedule"]

_BACKWARD_COMPUTE = (Op.BWD, Op.BWD_INPUT, Op.BWD_WEIGHT)
_SHORT_FIELDS = ("stage_device", "num_microbatches", "programs", "num_stages", "train", "kind")


def load_schedule(path: str | Path) -> Schedule:
    """Read, build and validate the schedule in `path` (.json or .csv); see the module doc.

    Raises ScheduleError naming the file (and line and instruction where there is one) for
    unreadable files, bad syntax, unknown instructions and invalid schedules.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScheduleError(f"{p}: no such schedule file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ScheduleError(f"{p}: cannot read the schedule file ({e})") from None
    suffix = p.suffix.lower()
    if suffix == ".json":
        sched, lines = _from_json(p, text)
    elif suffix == ".csv":
        sched, lines = _from_csv(p, text)
    else:
        raise ScheduleError(f"{p}: unknown schedule file type {p.suffix!r}; use .json or .csv")
    try:
        validate_schedule(sched)
    except ScheduleError as e:
        d, i = getattr(e, "device", None), getattr(e, "position", None)
        if d is not None and i is not None and lines is not None and lines[d][i] is not None:
            raise ScheduleError(f"{p}:{lines[d][i]}: instruction '{sched.programs[d][i]}': {e}") from None
        raise ScheduleError(f"{p}: {e}") from None
    return sched


# ---- JSON ---------------------------------------------------------------------------------


def _leaf_lines(text: str) -> dict[tuple[Any, ...], int]:
    """Line number (1-based) of every scalar in a valid JSON document, keyed by its path."""
    dec = json.JSONDecoder()
    out: dict[tuple[Any, ...], int] = {}
    ws = re.compile(r"[ \t\n\r]*")

    def skip(i: int) -> int:
        return ws.match(text, i).end()

    def walk(i: int, path: tuple[Any, ...]) -> int:
        i = skip(i)
        c = text[i]
        if c == "{":
            i = skip(i + 1)
            if text[i] == "}":
                return i + 1
            while True:
                key, i = dec.raw_decode(text, skip(i))
                i = skip(i) + 1  # ':'
                i = skip(walk(i, path + (key,)))
                if text[i] == "}":
                    return i + 1
                i += 1  # ','
        if c == "[":
            i = skip(i + 1)
            if text[i] == "]":
                return i + 1
            k = 0
            while True:
                i = skip(walk(i, path + (k,)))
                k += 1
                if text[i] == "]":
                    return i + 1
                i += 1  # ','
        out[path] = text.count("\n", 0, i) + 1
        _, j = dec.raw_decode(text, i)
        return j

    try:
        walk(0, ())
    except (ValueError, IndexError):  # cannot happen for text json.loads accepted
        return {}
    return out


def _from_json(p: Path, text: str) -> tuple[Schedule, list[list[int | None]] | None]:
    try:
        d = json.loads(text)
    except json.JSONDecodeError as e:
        raise ScheduleError(f"{p}:{e.lineno}: not valid JSON: {e.msg} (column {e.colno})") from None
    if not isinstance(d, dict):
        raise ScheduleError(f"{p}: a schedule file holds a JSON object, got {type(d).__name__}")
    pos = _leaf_lines(text)

    def at(*path: Any) -> str:
        line = pos.get(path)
        return f"{p}:{line}" if line is not None else f"{p}"

    if "format" in d:  # Schedule.to_dict form
        progs = d.get("programs")
        if isinstance(progs, list):
            for dev, prog in enumerate(progs):
                for i, t in enumerate(prog if isinstance(prog, list) else []):
                    try:
                        Instr.parse(t)
                    except ScheduleError as e:
                        raise ScheduleError(f"{at('programs', dev, i)}: instruction {t!r}: {e}") from None
        try:
            sched = Schedule.from_dict(d)
        except ScheduleError as e:
            raise ScheduleError(f"{p}: {e}") from None
        lines = [[pos.get(("programs", dev, i)) for i in range(len(prog))] for dev, prog in enumerate(sched.programs)]
        return sched, lines

    missing = [k for k in ("stage_device", "num_microbatches", "programs") if k not in d]
    if missing:
        raise ScheduleError(
            f"{p}: missing field(s) {missing}; a schedule file needs stage_device, num_microbatches and programs "
            "(or the full form written by Schedule.to_dict)"
        )
    extra = sorted(str(k) for k in d if k not in _SHORT_FIELDS)
    if extra:
        raise ScheduleError(f"{at(extra[0])}: unknown field(s) {extra}; known: {list(_SHORT_FIELDS)}")
    sd = d["stage_device"]
    if not isinstance(sd, list) or not sd or not all(_is_int(x) and x >= 0 for x in sd):
        raise ScheduleError(f"{at('stage_device')}: 'stage_device' must be a non-empty list of device indices (ints >= 0)")
    for k in ("num_microbatches", "num_stages"):
        if k in d and (not _is_int(d[k]) or d[k] < 1):
            raise ScheduleError(f"{at(k)}: {k!r} must be an int >= 1, got {d[k]!r}")
    if "train" in d and not isinstance(d["train"], bool):
        raise ScheduleError(f"{at('train')}: 'train' must be true or false, got {d['train']!r}")
    if "kind" in d and (not isinstance(d["kind"], str) or not d["kind"]):
        raise ScheduleError(f"{at('kind')}: 'kind' must be a non-empty string, got {d['kind']!r}")
    progs = d["programs"]
    if not isinstance(progs, list) or not all(isinstance(x, list) for x in progs):
        raise ScheduleError(f"{at('programs')}: 'programs' must be a list (one per device) of lists of instructions")
    programs: list[list[Instr]] = []
    lines: list[list[int | None]] = []
    for dev, prog in enumerate(progs):
        programs.append([])
        lines.append([])
        for i, t in enumerate(prog):
            where = at("programs", dev, i)
            if not isinstance(t, str):
                raise ScheduleError(f"{where}: instruction {t!r} must be a string like 'F(s0,mb0)'")
            try:
                programs[-1].append(Instr.parse(t.strip()))
            except ScheduleError as e:
                raise ScheduleError(f"{where}: instruction {t!r}: {e}") from None
            lines[-1].append(pos.get(("programs", dev, i)))
    num_stages = d.get("num_stages", len(sd))
    if len(sd) != num_stages:
        raise ScheduleError(f"{at('stage_device')}: stage_device has {len(sd)} entries for {num_stages} stages")
    while len(programs) < max(sd) + 1:  # a device with an empty program may be left out at the end
        programs.append([])
        lines.append([])
    return _build(p, d.get("kind", "custom"), num_stages, d["num_microbatches"], tuple(sd), programs, lines,
                  d.get("train"))


# ---- CSV ----------------------------------------------------------------------------------

_DEVICE_RE = re.compile(r"^d?(\d+)$")


def _from_csv(p: Path, text: str) -> tuple[Schedule, list[list[int | None]]]:
    rows: list[tuple[int, int, list[str]]] = []  # (line, device, cells)
    first = True
    for line_no, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip() or raw.lstrip().startswith("#"):
            continue
        cells = _split_row(raw)
        m = _DEVICE_RE.match(cells[0]) if cells else None
        if m is None:
            if first and not any(_looks_like_instr(c) for c in cells):
                first = False
                continue  # header row
            raise ScheduleError(
                f"{p}:{line_no}: first cell {cells[0] if cells else ''!r} is not a device; "
                "write rows as 'device,instruction,...' with the device as 0 or d0"
            )
        first = False
        rows.append((line_no, int(m.group(1)), [c for c in cells[1:] if c]))
    if not rows:
        raise ScheduleError(f"{p}: no instructions; write rows as 'device,instruction,...'")
    n_dev = max(dev for _, dev, _ in rows) + 1
    programs: list[list[Instr]] = [[] for _ in range(n_dev)]
    lines: list[list[int | None]] = [[] for _ in range(n_dev)]
    for line_no, dev, cells in rows:
        for c in cells:
            try:
                programs[dev].append(Instr.parse(c))
            except ScheduleError as e:
                raise ScheduleError(f"{p}:{line_no}: instruction {c!r}: {e}") from None
            lines[dev].append(line_no)
    # placement, stage and microbatch counts from the instructions
    owner: dict[int, tuple[int, int]] = {}  # stage -> (device, line)
    for dev, prog in enumerate(programs):
        for ins, line_no in zip(prog, lines[dev]):
            if ins.stage in owner and owner[ins.stage][0] != dev:
                d0, l0 = owner[ins.stage]
                raise ScheduleError(
                    f"{p}:{line_no}: instruction '{ins}': stage {ins.stage} is already on device {d0} "
                    f"(line {l0}); all instructions of a stage go on one device"
                )
            owner.setdefault(ins.stage, (dev, line_no))
    num_stages = max(owner) + 1
    absent = [s for s in range(num_stages) if s not in owner]
    if absent:
        raise ScheduleError(f"{p}: stage(s) {absent} have no instructions; every stage 0..{num_stages - 1} needs its own")
    sd = tuple(owner[s][0] for s in range(num_stages))
    m = max(ins.mb for prog in programs for ins in prog) + 1
    return _build(p, "custom", num_stages, m, sd, programs, lines, None)


def _split_row(raw: str) -> list[str]:
    """Cells of a CSV row, where commas inside an instruction's parentheses do not split:
    ``0,F(s0,mb0),"B(s0,mb0)"`` -> ['0', 'F(s0,mb0)', 'B(s0,mb0)'] (quotes are optional)."""
    cells, cur, depth = [], [], 0
    for ch in raw:
        if ch == "," and depth == 0:
            cells.append("".join(cur))
            cur = []
            continue
        depth += (ch == "(") - (ch == ")")
        cur.append(ch)
    cells.append("".join(cur))
    return [c.strip().strip('"').strip("'").strip() for c in cells]


def _looks_like_instr(cell: str) -> bool:
    try:
        Instr.parse(cell)
        return True
    except ScheduleError:
        return False


# ---- shared -------------------------------------------------------------------------------


def _build(
    p: Path,
    kind: str,
    num_stages: int,
    m: int,
    sd: tuple[int, ...],
    programs: list[list[Instr]],
    lines: list[list[int | None]],
    train: bool | None,
) -> tuple[Schedule, list[list[int | None]]]:
    """Schedule from parsed programs: infer train, add messages to compute-only programs."""
    all_ins = [ins for prog in programs for ins in prog]
    if train is None:
        train = any(ins.op in _BACKWARD_COMPUTE for ins in all_ins)
    for dev, prog in enumerate(programs):
        for i, ins in enumerate(prog):
            if ins.stage >= num_stages or ins.mb >= m:
                what = (f"stage {ins.stage} does not exist (stages 0..{num_stages - 1})" if ins.stage >= num_stages
                        else f"microbatch {ins.mb} does not exist (microbatches 0..{m - 1})")
                raise ScheduleError(f"{p}:{lines[dev][i]}: instruction '{ins}': {what}")
    if all_ins and all(ins.op in _COMPUTE for ins in all_ins):
        programs, lines = _add_messages(programs, lines, sd)
    try:
        sched = Schedule(kind, num_stages, m, sd, tuple(tuple(x) for x in programs), train)
    except ScheduleError as e:
        raise ScheduleError(f"{p}: {e}") from None
    return sched, lines


def _add_messages(
    programs: list[list[Instr]], lines: list[list[int | None]], sd: tuple[int, ...]
) -> tuple[list[list[Instr]], list[list[int | None]]]:
    """Compute-only programs -> full programs, messages placed as `emit_schedule` places them."""
    last = len(sd) - 1
    out: list[list[Instr]] = []
    out_lines: list[list[int | None]] = []
    for prog, pl in zip(programs, lines):
        new: list[Instr] = []
        nl: list[int | None] = []

        def add(ins: Instr, line: int | None) -> None:
            new.append(ins)
            nl.append(line)

        for ins, line in zip(prog, pl):
            s, mb = ins.stage, ins.mb
            if ins.op is Op.FWD:
                if s > 0:
                    add(Instr(Op.RECV_ACT, s, mb, sd[s - 1]), line)
                add(ins, line)
                if s < last:
                    add(Instr(Op.SEND_ACT, s, mb, sd[s + 1]), line)
            elif ins.op in (Op.BWD, Op.BWD_INPUT):
                if s < last:
                    add(Instr(Op.RECV_GRAD, s, mb, sd[s + 1]), line)
                add(ins, line)
                if s > 0:
                    add(Instr(Op.SEND_GRAD, s, mb, sd[s - 1]), line)
            else:
                add(ins, line)
        out.append(new)
        out_lines.append(nl)
    return out, out_lines
