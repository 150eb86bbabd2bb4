"""The user-facing entry points: `fxpipe.compile`, `fxpipe.plan` and `fxpipe.simulate`.

`CompiledModel` (the local backend's model, runtime/compiled_model.py) is re-exported here,
where it has always been importable from.

Example:
    >>> cm = fxpipe.compile(model, devices=["cpu", "cpu"], example_inputs=(x,), microbatches=4)  # doctest: +SKIP
    >>> y = cm(x)                                                                                 # doctest: +SKIP
    >>> loss = cm.step(x, target=t, loss_fn=torch.nn.functional.cross_entropy)                    # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, Sequence

from torch import nn

from fxpipe.compiler.cluster import Cluster, Device
from fxpipe.compiler.pipeline import MICROBATCHES_UNSET, simulate_plan, Compilation, build_from_plan, build_plan
from fxpipe.compiler.plan import Plan
from fxpipe.compiler.stateful import warn_per_microbatch_state
from fxpipe.errors import PlanError
from fxpipe.passes.emit_schedule import Schedule
from fxpipe.runtime.compiled_model import CompiledModel, _refuse_meta_model, _runnable_device

__all__ = ["compile", "plan", "simulate", "CompiledModel"]


def plan(model: nn.Module, devices: Sequence[str | Device] | Cluster, example_inputs: Any = None, *,
         example_kwargs: dict | None = None, microbatches: int = MICROBATCHES_UNSET,
         schedule: "str | Schedule | os.PathLike" = "1f1b", train: bool = True, optimizer: str = "adam",
         capture_method: str = "auto", leaf_modules: tuple[type, ...] = (), virtual_stages: int | None = None,
         progress: bool = False, profile: bool = False, fuse: bool = False,
         recompute: bool | str = "auto", offload: str = "auto") -> Plan:
    """Plan `model` for `devices` offline: decides stages, placement and schedule, runs nothing.

    Works for models on the meta device (no memory is allocated for parameters).
    `schedule` may be the user's own (a Schedule or a .json/.csv file, see `compile`), or
    "auto"; `microbatches` may be "auto" (see `compile`); `recompute` and `offload` as in `compile`.
    `profile=True` times every unit on the devices instead of pricing it by the roofline.

    Example:
        >>> p = fxpipe.plan(model, ["cpu"] * 3, example_inputs=(x,))   # doctest: +SKIP
        >>> print(p.summary())                                        # doctest: +SKIP
    """
    return build_plan(model, devices, example_inputs, example_kwargs, microbatches=microbatches, schedule=schedule,
                      train=train, optimizer=optimizer, capture_method=capture_method, leaf_modules=leaf_modules,
                      virtual_stages=virtual_stages, progress=progress, profile=profile, fuse=fuse,
                      recompute=recompute, offload=offload).plan


def simulate(plan: Plan) -> Any:
    """Play `plan`'s schedule against its cost model, with compute and communication on
    separate lanes: each instruction's start and end, the step time, the bubble fraction and
    the activation memory over time per device (a `Timeline`).

    Example:
        >>> tl = fxpipe.simulate(fxpipe.Plan.load("plan.json"))     # doctest: +SKIP
        >>> tl.step_time, tl.bubble_fraction, tl.peak_memory         # doctest: +SKIP
    """
    if not isinstance(plan, Plan):
        raise PlanError(f"simulate needs a fxpipe.Plan, got {type(plan).__name__}")
    return simulate_plan(plan)


def compile(model: nn.Module, devices: Sequence[str | Device] | Cluster | None = None, example_inputs: Any = None, *,
            example_kwargs: dict | None = None, microbatches: int | None = None,
            schedule: "str | Schedule | os.PathLike | None" = None, optimizer: str | None = None,
            plan: Plan | str | os.PathLike | None = None, capture_method: str = "auto",
            leaf_modules: tuple[type, ...] = (), virtual_stages: int | None = None, timeout: float = 300.0,
            progress: bool = False, profile: bool = False, backend: str = "local",
            fuse: bool = False, recompute: bool | str | None = None, offload: str | None = None) -> "CompiledModel":
    """Compile `model` into a pipeline over `devices`.

    Args:
        model: any nn.Module; its parameters are moved to the devices of the stages using them.
        devices: e.g. ["cpu", "cpu"] or ["cuda:0", "cuda:1"], or a Cluster. May be left out
            when `plan` is given (the plan's devices are used).
        example_inputs: a real call's arguments (tensor, tuple or dict); dim 0 is the batch.
        microbatches: m, the number of microbatches a batch is split into (default 4), or
            "auto": the candidate (1, 2, 4, .., max(32, 2 x devices), at most the batch)
            with the smallest predicted step among those that fit.
        schedule: "1f1b" (default), "gpipe", "interleaved" (v virtual stages per device,
            round-robin), "zb-h1" (zero bubble: backward split into input and weight
            gradients, weight gradients deferred into the bubbles), or "auto": the one
            with the smallest predicted step that fits (`plan.predicted["auto"]` lists all).
        recompute: activation recomputation per stage: "auto" (default: only stages that
            would not fit in memory otherwise keep just their boundary and re-run their
            forward in backward), True (every stage) or False (none). Not with "zb-h1".
        offload: weight streaming per stage: "auto" (default: only a stage that would not fit
            in its device's memory otherwise keeps its params, grads and optimizer state in
            pinned host memory and copies each unit's weights in, prefetched while the previous
            unit computes, for every microbatch's forward and backward; only if it then fits),
            "on" (every stage; for benchmarks and tests) or "off". Not on the same stage as
            recomputation, not with "zb-h1".
        virtual_stages: v for "interleaved" (default 2).
        optimizer: optimizer kind for the memory model ("adam" (default), "sgd", "sgd-momentum", ...).
        plan: a Plan (or a plan file path) to use instead of planning; it must be for this model.
            Its devices, microbatches, schedule and optimizer are used; giving different ones
            here is an error rather than a silent choice between the two.
        timeout: seconds a worker waits for a message before failing.
        fuse: rewrite fusable chains (bias+GELU, add+LayerNorm, scale+mask+softmax,
            dropout+add) into fused ops: CuPy kernels on CUDA, the same eager ops elsewhere.
            A plan records it, and compile(plan=...) follows the plan.
        backend: "local" (one process, a worker thread per device) or "distributed" (one
            rank per device on torch.distributed, launched by torchrun: every rank runs the
            same script and builds only its own stages; see runtime/dist_model.py).

    Returns:
        A CompiledModel: call it for inference, `.step(...)` for a training step.
    """
    if backend not in ("local", "distributed"):
        raise PlanError(f"backend must be 'local' (one process, a worker thread per device) or 'distributed' "
                        f"(one rank per device on torch.distributed, launched by torchrun), got {backend!r}")
    if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and math.isfinite(timeout) and timeout > 0):
        raise PlanError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if plan is None:
        if devices is None:
            raise PlanError("compile needs devices (e.g. devices=['cpu', 'cpu']) or a plan "
                            "(plan=fxpipe.plan(...) or plan='plan.json'); neither was given")
        if backend == "distributed":  # not launched as one rank per device: say so before planning
            n = len(devices.devices) if isinstance(devices, Cluster) else \
                len(devices) if isinstance(devices, (list, tuple)) else None
            if n:
                from fxpipe.runtime.dist_model import check_launch

                check_launch(n)
        elif isinstance(devices, (Cluster, list, tuple)):
            # devices this process cannot run on (GPU presets, a cluster file's, 'meta') are for
            # fxpipe.plan: refuse before planning, which can take minutes on a large model
            cluster = devices if isinstance(devices, Cluster) else Cluster.from_devices(list(devices))
            for i, d in enumerate(cluster.devices):
                _runnable_device(d, i)
            _refuse_meta_model(model)
        comp = build_plan(model, devices, example_inputs, example_kwargs,
                          microbatches=MICROBATCHES_UNSET if microbatches is None else microbatches,
                          schedule="1f1b" if schedule is None else schedule, train=True,
                          optimizer="adam" if optimizer is None else optimizer, capture_method=capture_method,
                          leaf_modules=leaf_modules, virtual_stages=virtual_stages, progress=progress,
                          profile=profile, fuse=fuse, recompute="auto" if recompute is None else recompute,
                          offload="auto" if offload is None else offload)
        # distributed: ranks whose planning came out otherwise (each rank measures its CPU, or
        # profiles, itself) adopt rank 0's plan through this, instead of refusing to run
        rebuild = lambda p: build_from_plan(model, p, example_inputs, example_kwargs,  # noqa: E731
                                            capture_method=capture_method, leaf_modules=leaf_modules,
                                            progress=progress)
        return _make_compiled(model, comp, timeout, backend, rebuild)
    if isinstance(plan, (str, os.PathLike)):
        plan = Plan.load(plan)
    elif not isinstance(plan, Plan):
        raise PlanError(f"plan must be a fxpipe.Plan or the path of a plan file, got {type(plan).__name__}")
    _require_same_as_plan(plan, devices, microbatches, schedule, optimizer)
    if backend == "distributed":
        from fxpipe.runtime.dist_model import check_launch

        check_launch(len(plan.cluster.devices))
    planned_v = plan.num_stages // max(1, len(plan.cluster.devices))
    if virtual_stages is not None and virtual_stages != planned_v:  # else silently ignored: the plan decides
        raise PlanError(f"the plan was made with {planned_v} stage(s) per device (schedule {plan.schedule.kind!r}) but "
                        f"virtual_stages={virtual_stages!r} was given; leave virtual_stages out to use the plan's, or "
                        "re-plan with fxpipe.plan(..., schedule='interleaved', virtual_stages=...)")
    if recompute is not None:
        raise PlanError("recompute is decided per stage by the plan (its stages' recompute flags); leave recompute "
                        "out when giving plan=, or re-plan with fxpipe.plan(..., recompute=...)")
    if offload is not None:
        raise PlanError("offload is decided per stage by the plan (its stages' offload flags); leave offload out "
                        "when giving plan=, or re-plan with fxpipe.plan(..., offload=...)")
    if profile:
        raise PlanError("profile=True decides costs while planning, but a plan was given; re-plan with "
                        "fxpipe.plan(..., profile=True) and pass that plan")
    comp = build_from_plan(model, plan, example_inputs, example_kwargs, capture_method=capture_method,
                           leaf_modules=leaf_modules, progress=progress)
    return _make_compiled(model, comp, timeout, backend)


def _make_compiled(model: nn.Module, comp: Compilation, timeout: float, backend: str,
                   rebuild: Callable[[Plan], Compilation] | None = None) -> Any:
    if backend == "distributed":
        from fxpipe.runtime.dist_model import DistributedCompiledModel, check_launch

        # every rank compiles the same model: one warning (rank 0's) rather than one per rank
        if check_launch(len(comp.plan.cluster.devices))[1] == 0:
            warn_per_microbatch_state(model, comp.captured.gm, comp.plan.microbatches)

        return DistributedCompiledModel(model, comp, timeout=timeout, rebuild=rebuild)
    warn_per_microbatch_state(model, comp.captured.gm, comp.plan.microbatches)
    return CompiledModel(model, comp, timeout=timeout)


def _require_same_as_plan(plan: Plan, devices: Any, microbatches: Any, schedule: Any, optimizer: Any) -> None:
    """compile(plan=...) takes its settings from the plan; a different explicit one is a conflict."""
    theirs = [d.name for d in plan.cluster.devices]
    if devices is not None:
        cluster = devices if isinstance(devices, Cluster) else Cluster.from_devices(devices)
        ours = [d.name for d in cluster.devices]
        if sorted(ours) != sorted(theirs):  # placement may have reordered them
            raise PlanError(f"the plan was made for devices {theirs} but devices={ours} was given; leave devices out "
                            "to use the plan's devices, or re-plan the model for these devices")
    kind = plan.schedule.kind
    for name, given, planned in (("microbatches", microbatches, plan.microbatches), ("schedule", schedule, kind),
                                 ("optimizer", optimizer, plan.optimizer)):
        if given is not None and given != planned:
            raise PlanError(f"the plan was made with {name}={planned!r} but {name}={given!r} was given; leave "
                            f"{name} out to use the plan's, or re-plan the model with {name}={given!r}")
