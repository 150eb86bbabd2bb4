"""Lowering: a Schedule -> one generated Python function per device.

The text `CompiledModel.code(d)` shows is exactly the text that is compiled and run: each
instruction becomes one call on the runtime object (`rt`), annotated with the instruction it
came from, so a user can read what device d will do, in order.

Example:
    >>> from fxpipe.passes.emit_schedule import emit_schedule
    >>> print(device_source(emit_schedule("gpipe", 2, 1), 1, ["cpu", "cpu"]))  # doctest: +NORMALIZE_WHITESPACE
    def device_1(rt):
        \"\"\"device 1 (cpu): stage 1; schedule gpipe, 1 microbatches, train\"\"\"
        rt.recv_act(1, 0, src=0)  # RECV_ACT(s1,mb0<-d0)
        rt.forward(1, 0)  # F(s1,mb0)
        rt.backward(1, 0)  # B(s1,mb0)
        rt.send_grad(1, 0, dst=0)  # SEND_GRAD(s1,mb0->d0)
"""

from __future__ import annotations

from typing import Callable, Sequence

from fxpipe.passes.emit_schedule import Instr, Op, Schedule

__all__ = ["device_source", "compile_program"]

_CALL = {
    Op.FWD: "rt.forward({s}, {mb})",
    Op.BWD: "rt.backward({s}, {mb})",
    Op.SEND_ACT: "rt.send_act({s}, {mb}, dst={peer})",
    Op.RECV_ACT: "rt.recv_act({s}, {mb}, src={peer})",
    Op.SEND_GRAD: "rt.send_grad({s}, {mb}, dst={peer})",
    Op.RECV_GRAD: "rt.recv_grad({s}, {mb}, src={peer})",
}
# Split backward (zero-bubble schedules), when the schedule IR has it.
for _name, _call in (("BWD_INPUT", "rt.backward_input({s}, {mb})"), ("BWD_WEIGHT", "rt.backward_weight({s}, {mb})")):
    if hasattr(Op, _name):
        _CALL[getattr(Op, _name)] = _call


def _line(ins: Instr) -> str:
    call = _CALL[ins.op].format(s=ins.stage, mb=ins.mb, peer=ins.peer)
    return f"    {call}  # {ins}"


def device_source(schedule: Schedule, device: int, device_names: Sequence[str]) -> str:
    """The generated program of one device as Python source."""
    stages = [s for s, d in enumerate(schedule.stage_device) if d == device]
    head = (f"device {device} ({device_names[device]}): stage{'s' if len(stages) != 1 else ''} "
            f"{', '.join(map(str, stages)) or '-'}; schedule {schedule.kind}, {schedule.num_microbatches} microbatches, "
            f"{'train' if schedule.train else 'inference'}")
    body = [_line(ins) for ins in schedule.programs[device]] or ["    pass"]
    return "\n".join([f"def device_{device}(rt):", f'    """{head}"""', *body]) + "\n"


def compile_program(schedule: Schedule, device: int, device_names: Sequence[str]) -> tuple[str, Callable]:
    """Generate and compile one device's program; returns (source, function)."""
    src = device_source(schedule, device, device_names)
    namespace: dict = {}
    exec(compile(src, f"<fxpipe device {device} program>", "exec"), namespace)
    return src, namespace[f"device_{device}"]
