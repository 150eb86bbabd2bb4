"""Planning options checked and resolved before any work: example inputs, microbatch counts
and sizes, the schedule (a built-in kind or the user's own), virtual stages, and the
recompute and offload modes per schedule.

Separate from `pipeline.py` so the pipeline reads as its passes; the CLI checks option
clashes with these before the user's factory builds the model. The `_` names are private
to fxpipe.compiler (`pipeline.py` and `auto_plan.py` import them).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from fxpipe.compiler.plan import OPTIMIZER_STATE_FACTOR
from fxpipe.compiler.stage_pricing import _splits_backward
from fxpipe.errors import PlanError
from fxpipe.passes.emit_schedule import Schedule, validate_schedule
from fxpipe.passes.load_schedule import load_schedule

__all__ = ["SCHEDULES", "normalize_inputs", "microbatch_sizes", "virtual_stage_count", "recompute_mode",
           "offload_mode", "check_options", "MICROBATCHES_UNSET", "custom_schedule", "_stage_devices",
           "_resolve_schedule", "_mode_for", "_offload_for"]

SCHEDULES = ("gpipe", "1f1b", "interleaved", "zb-h1")


def normalize_inputs(example_inputs: Any, example_kwargs: dict | None) -> tuple[tuple, dict]:
    """Accept a tensor, a tuple of args, or a dict of kwargs as example inputs."""
    kwargs = dict(example_kwargs or {})
    if example_inputs is None:
        args: tuple = ()
    elif isinstance(example_inputs, torch.Tensor):
        args = (example_inputs,)
    elif isinstance(example_inputs, dict):
        args, kwargs = (), {**example_inputs, **kwargs}
    elif isinstance(example_inputs, (list, tuple)):
        args = tuple(example_inputs)
    else:
        raise PlanError(f"example_inputs must be a tensor, a tuple of arguments or a dict of keyword arguments, "
                        f"got {type(example_inputs).__name__}")
    if not args and not kwargs:
        raise PlanError("example_inputs are required: pass a real batch, e.g. example_inputs=(x,)")
    return args, kwargs


def microbatch_sizes(batch: int, m: int) -> list[int]:
    """Sizes of m microbatches of a batch (torch.tensor_split's: the first ones one larger)."""
    if batch < 1:  # "use microbatches <= 0" below would be no advice at all
        raise PlanError(f"the batch is empty (dim 0 of the inputs is {batch}); give at least one sample per "
                        f"microbatch ({m} here)")
    if m > batch:
        raise PlanError(f"{m} microbatches asked for a batch of {batch} samples: each microbatch needs at least "
                        f"one sample; use microbatches <= {batch} or a larger batch")
    return [batch // m + (1 if i < batch % m else 0) for i in range(m)]


def _stage_devices(schedule: str, p: int, v: int) -> tuple[int, ...]:
    """Stage -> device: one stage per device, or v round-robin virtual stages (interleaved)."""
    return tuple(s % p for s in range(p * v)) if schedule == "interleaved" else tuple(range(p))


def virtual_stage_count(schedule: str, virtual_stages: Any) -> int:
    """v: 2 by default for the interleaved schedule, 1 (and only 1) for the others."""
    if virtual_stages is None:
        return 2 if schedule == "interleaved" else 1
    if not isinstance(virtual_stages, int) or isinstance(virtual_stages, bool) or virtual_stages < 1:
        raise PlanError(f"virtual_stages must be a positive integer, got {virtual_stages!r}")
    if virtual_stages > 1 and schedule != "interleaved":
        raise PlanError(f"virtual_stages={virtual_stages} needs schedule='interleaved' (schedule {schedule!r} runs "
                        "one stage per device)")
    return virtual_stages


def recompute_mode(recompute: Any) -> str:
    """The partitioner's mode for the `recompute` option: True -> "on", False -> "off", "auto"."""
    if recompute is True:
        return "on"
    if recompute is False:
        return "off"
    if isinstance(recompute, str) and recompute == "auto":
        return "auto"
    raise PlanError(f"recompute must be True (every stage recomputes its activations in backward), False (none) "
                    f"or 'auto' (only stages that would not fit otherwise), got {recompute!r}")


def offload_mode(offload: Any) -> str:
    """The partitioner's mode for the `offload` option ("off", "on" or "auto"), checked."""
    if isinstance(offload, str) and offload in ("off", "on", "auto"):
        return offload
    raise PlanError(f"offload must be 'auto' (a stage streams its weights from host memory only when it would not "
                    f"fit otherwise), 'off' (never) or 'on' (every stage), got {offload!r}")


def check_options(*, microbatches: Any, schedule: Any, optimizer: Any, train: Any, recompute: Any = False,
                  offload: Any = "off") -> None:
    """Refuse bad planning options before any work is done (PlanError says what to pass).

    `schedule` and `microbatches` may be "auto" (auto mode picks them)."""
    if not isinstance(schedule, str) or schedule not in SCHEDULES + ("auto",):
        raise PlanError(f"unknown schedule {schedule!r}: use one of {', '.join(map(repr, SCHEDULES + ('auto',)))}")
    if not isinstance(optimizer, str) or optimizer not in OPTIMIZER_STATE_FACTOR:
        raise PlanError(f"unknown optimizer {optimizer!r}: use one of {', '.join(map(repr, OPTIMIZER_STATE_FACTOR))} "
                        "(it decides how much optimizer state the memory model counts per parameter)")
    if microbatches != "auto" and (not isinstance(microbatches, int) or isinstance(microbatches, bool)
                                   or microbatches < 1):
        raise PlanError(f"microbatches must be a positive integer (e.g. microbatches=4) or 'auto', "
                        f"got {microbatches!r} of type {type(microbatches).__name__}")
    if not isinstance(train, bool):
        raise PlanError(f"train must be True or False, got {train!r}")
    mode = recompute_mode(recompute)
    if mode == "on" and not train:
        raise PlanError("recompute=True needs train=True: a forward-only plan keeps no activations to recompute; "
                        "leave recompute out")
    if mode == "on" and schedule == "zb-h1":
        raise PlanError("recompute=True cannot be combined with schedule='zb-h1': its split backward (BI then BW) "
                        "would recompute each forward twice, and fxpipe's BI/BW runtime does not support it; use "
                        "schedule='1f1b' (or 'gpipe', 'interleaved') with recompute, or recompute='auto'")
    off = offload_mode(offload)
    if off == "on" and schedule == "zb-h1":
        raise PlanError("offload='on' cannot be combined with schedule='zb-h1': its split backward (BI then BW) "
                        "would stream each unit's weights twice, and fxpipe's BI/BW runtime does not stream them; "
                        "use schedule='1f1b' (or 'gpipe', 'interleaved') with offload, or offload='auto'")


class _Unset:
    """The default of `microbatches`: 4, or what a custom schedule says (None is a bad value)."""

    def __repr__(self) -> str:
        return "4 (or the schedule's)"


MICROBATCHES_UNSET: Any = _Unset()


def custom_schedule(schedule: Any) -> Schedule | None:
    """The user's own schedule when `schedule` is one (a Schedule, or the path of a .json/.csv
    file, read by `load_schedule`), None when it names a built-in kind."""
    if isinstance(schedule, Schedule):
        validate_schedule(schedule)
        return schedule
    if isinstance(schedule, os.PathLike) or (
            isinstance(schedule, str) and schedule not in SCHEDULES and Path(schedule).suffix.lower() in (".json", ".csv")):
        return load_schedule(schedule)
    return None


def _resolve_schedule(schedule: Any, microbatches: Any, p: int, train: bool,
                      virtual_stages: Any) -> tuple[str, Schedule | None, Any]:
    """(kind, user schedule or None, m): a user schedule decides the stage count and m."""
    user = custom_schedule(schedule)
    given = microbatches is not MICROBATCHES_UNSET
    if user is None:
        return schedule, None, microbatches if given else 4
    if given and microbatches != user.num_microbatches:
        raise PlanError(f"microbatches={microbatches!r} was given but the schedule runs {user.num_microbatches} "
                        "microbatches; leave microbatches out (the schedule decides it) or write the schedule for "
                        f"{microbatches}")
    if user.num_devices != p:
        raise PlanError(f"the schedule has programs for {user.num_devices} devices but the cluster has {p} devices; "
                        f"give {user.num_devices} devices or write the schedule for {p}")
    if user.train != train:
        raise PlanError(f"the schedule is a {'training' if user.train else 'forward-only'} schedule but "
                        f"train={train} was asked for")
    if virtual_stages is not None:
        raise PlanError("virtual_stages is decided by a custom schedule's stage_device; leave it out")
    return user.kind, user, user.num_microbatches


def _mode_for(mode: str, kind: str, train: bool) -> str:
    """Recompute mode per schedule: none when forward-only, none with the split backward
    (zb-h1's runtime does not recompute; check_options refuses recompute=True there)."""
    return "off" if not train or kind == "zb-h1" else mode


def _offload_for(off: str, kind: str, user: Schedule | None = None) -> str:
    """Offload mode per schedule: none with the split backward (zb-h1, or a user schedule with
    BI/BW): its runtime does not stream weights (check_options refuses offload='on' there)."""
    split = kind == "zb-h1" or (user is not None and _splits_backward(user))
    return "off" if split else off
