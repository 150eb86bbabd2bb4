"""The user-facing entry points: `fxpipe.compile`, `fxpipe.plan` and `CompiledModel`.

Example:
    >>> cm = fxpipe.compile(model, devices=["cpu", "cpu"], example_inputs=(x,), microbatches=4)  # doctest: +SKIP
    >>> y = cm(x)                                                                                 # doctest: +SKIP
    >>> loss = cm.step(x, target=t, loss_fn=torch.nn.functional.cross_entropy)                    # doctest: +SKIP
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.utils._pytree as pytree
from torch import nn

from fxpipe.compiler.capture import Captured
from fxpipe.compiler.cluster import Cluster, Device
from fxpipe.compiler.pipeline import MICROBATCHES_UNSET, simulate_plan, Compilation, build_from_plan, build_plan, microbatch_sizes
from fxpipe.compiler.plan import Plan
from fxpipe.compiler.stateful import check_shared_statistics, shared_buffer_writes, warn_per_microbatch_state
from fxpipe.errors import FxpipeError, PlanError, RuntimeMismatchError
from fxpipe.passes.emit_schedule import Schedule, emit_schedule
from fxpipe.passes.simulate_schedule import Timeline, _device_peak_inflight
from fxpipe.passes.split_stages import StageGraph, build_stage_module, resolve_attr, split_stages
from fxpipe.runtime.local import LocalRuntime, StageRunner, _StepState, measured_timeline
from fxpipe.runtime.offload import keep_weights_on_host
from fxpipe.runtime.program import compile_program
from fxpipe.runtime.weight_grad import with_split_backward

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


class CompiledModel:
    """A model compiled into a pipeline. Trains with `step`, infers with `__call__`.

    `parameters()` are the original model's parameters (moved to their stage's device), so any
    torch.optim optimizer works; `state_dict()` has the original keys.
    """

    def __init__(self, model: nn.Module, comp: Compilation, timeout: float = 300.0):
        self.model = model
        self.plan: Plan = comp.plan
        self._cap: Captured = comp.captured
        p = self.plan
        # every device is checked before the first parameter moves: a failure leaves the model as it was
        self.devices = [_runnable_device(d, i) for i, d in enumerate(p.cluster.devices)]
        _refuse_meta_model(model)
        self.stage_graphs: list[StageGraph] = split_stages(self._cap.gm, [s.units for s in p.stages])
        self._shared_writes = shared_buffer_writes(self._cap.gm, [s.units for s in p.stages],
                                                   [sg.attrs for sg in self.stage_graphs])
        self._replicas: list[tuple[torch.Tensor, torch.Tensor]] = []  # (canonical, replica)
        self._module_replicas: list[tuple[nn.Module, nn.Module]] = []  # (user's module, another stage's copy)
        self.last_timeline: Timeline | None = None  # the last recorded step (step(trace=...) / measure_memory)
        self.last_memory: tuple[float, ...] | None = None  # its measured peak activation bytes per device
        runners = self._build_runners()
        if any(i.op.name in ("BWD_INPUT", "BWD_WEIGHT") for prog in p.schedule.programs for i in prog):
            runners = [with_split_backward(r) for r in runners]  # zero-bubble: BI and BW run apart
        threads = [d.threads for d in p.cluster.devices]
        self._rt = LocalRuntime(runners, threads, timeout=timeout)
        names = [d.name for d in p.cluster.devices]
        self._train_prog = [compile_program(p.schedule, d, names) for d in range(len(names))]
        infer = emit_schedule("forward", p.num_stages, p.microbatches, stage_device=p.schedule.stage_device, train=False)
        self._infer_sched = infer
        self._infer_prog = [compile_program(infer, d, names) for d in range(len(names))]

    # ---- construction ------------------------------------------------------------------
    def _build_runners(self) -> list[StageRunner]:
        owner: dict[int, int] = {}  # id(tensor) -> stage that owns the canonical copy
        runners = []
        for sg, sp in zip(self.stage_graphs, self.plan.stages):
            dev = self.devices[sp.device]
            offload = getattr(sp, "offload", False)
            objects: dict[str, Any] = {}
            for target in sg.attrs + sg.modules:
                obj = resolve_attr(self.model, self._cap.gm, target)
                # an offloaded stage's weights stay on the host (runtime/offload.py streams them)
                objects[target] = self._place(obj, sg.index, torch.device("cpu") if offload else dev, owner)
            if offload:
                keep_weights_on_host(objects, dev)  # buffers and constants to the device, parameters pinned
            module = build_stage_module(sg, objects, dev)
            positions = tuple(self._cap.input_names.index(n) for n in sg.model_inputs)
            runners.append(StageRunner(sg.index, module, dev, sp.device, len(sg.recv), positions,
                                       sg.index == len(self.stage_graphs) - 1, recompute=sp.recompute,
                                       offload=offload))
        return runners

    def _place(self, obj: Any, stage: int, dev: torch.device, owner: dict[int, int]) -> Any:
        """Move a parameter/buffer/module to its stage's device; a tensor a second stage
        also uses becomes a replica there (tied weights), kept in sync by the runtime."""
        if isinstance(obj, nn.Module):
            tensors = list(obj.parameters()) + list(obj.buffers())
            if all(owner.setdefault(id(t), stage) == stage for t in tensors):
                return obj.to(dev)
            import copy

            rep = copy.deepcopy(obj).to(dev)
            for a, b in zip(tensors, list(rep.parameters()) + list(rep.buffers())):
                self._replicas.append((a, b))
            self._module_replicas.append((obj, rep))
            return rep
        if not isinstance(obj, torch.Tensor):
            return obj
        if owner.setdefault(id(obj), stage) == stage:
            if obj.device != dev:
                obj.data = obj.data.to(dev)
            return obj
        rep = obj.detach().to(dev, copy=True)
        if isinstance(obj, nn.Parameter):
            rep = nn.Parameter(rep, requires_grad=obj.requires_grad)
        self._replicas.append((obj, rep))
        return rep

    # ---- running -----------------------------------------------------------------------
    def _split(self, args: tuple, kwargs: dict) -> tuple[list[list[torch.Tensor]], list[int], int]:
        sig = self._cap.signature
        try:
            sig.bind(*args, **kwargs)
        except TypeError as e:
            raise RuntimeMismatchError(
                f"this call does not fit {type(self.model).__name__}.forward{sig}: {e}; call the compiled model "
                f"with the arguments example_inputs had (tensor inputs {list(self._cap.input_names)}; "
                "only their batch size may change)") from None
        flat = self._cap.flat_inputs(args, kwargs)
        batch = {n: tuple(t.shape) for n, t in zip(self._cap.input_names, flat) if t.dim() > 0}
        if len({shape[0] for shape in batch.values()}) != 1:
            raise RuntimeMismatchError(f"input tensors disagree on the batch size (dim 0): shapes {batch}; "
                                       "every tensor input must have the same batch size as dim 0")
        b = next(iter(batch.values()))[0]
        _check_like_planned(self._cap, flat)
        sizes = microbatch_sizes(b, self.plan.microbatches)
        chunks = [torch.tensor_split(t, self.plan.microbatches) if t.dim() else [t] * self.plan.microbatches for t in flat]
        per_mb = [[c[i] for c in chunks] for i in range(self.plan.microbatches)]
        return per_mb, sizes, b

    def _sync_replicas(self) -> None:
        with torch.no_grad():
            for canon, rep in self._replicas:
                rep.copy_(canon.to(rep.device))
        for canon, rep in self._module_replicas:  # cm.eval() reaches the copies too
            for a, b in zip(canon.modules(), rep.modules()):
                b.training = a.training

    def _check_replicated_statistics(self) -> None:
        """Refuse a call in which a module that several stages use would update running
        statistics (`check_shared_statistics`): each stage updates its own copy."""
        check_shared_statistics(self.model, [canon for canon, _ in self._module_replicas], self._shared_writes)

    def _reduce_replica_grads(self) -> None:
        with torch.no_grad():
            for canon, rep in self._replicas:
                if rep.grad is None:
                    continue
                g = rep.grad.to(canon.device)
                canon.grad = g.clone() if canon.grad is None else canon.grad.add_(g)
                rep.grad = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Pipelined inference: equals `model(*args, **kwargs)` (outputs concatenated over microbatches)."""
        self._cap.check_modes(self.model)
        self._check_replicated_statistics()
        per_mb, sizes, _ = self._split(args, kwargs)
        self._sync_replicas()
        state = _StepState(inputs=per_mb, train=False)
        self._rt.run([f for _, f in self._infer_prog], state)
        flat = []
        for k, free in enumerate(self._cap.batch_free_outputs()):
            vals = [state.results[mb][k] for mb in range(len(per_mb))]
            flat.append(vals[0] if free else _concat(vals, sizes))
        return _unflatten(self._cap.out_spec, _inference_outputs(flat, self.model, args, kwargs))

    def step(self, *args: Any, target: Any, loss_fn: Callable[[Any, Any], torch.Tensor], trace: str | None = None,
             measure_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        """One pipelined forward+backward; gradients accumulate into `.grad` as in eager.

        `loss_fn(output, target)` sees the model's own output structure for one microbatch
        and must return a scalar mean over that microbatch's samples; fxpipe weights each
        microbatch by its share of the batch, so the gradients equal those of
        `loss_fn(model(x), target).backward()` on the whole batch. Returns that loss (detached).
        `target` is split along dim 0 like the inputs; `target=None` (or None entries in a
        structure) reaches every microbatch's `loss_fn` as None.

        `trace="run.json"` records every instruction's real start and end and writes a
        Chrome/Perfetto trace with the same event names as the predicted one
        (`fxpipe inspect plan.json --format trace`); `cm.last_timeline` keeps it.

        While recording (`trace=...` or `measure_memory=True`) every forward also measures the
        bytes autograd saves for backward; `cm.last_timeline.memory` is the activation memory
        over time per device (allocated at F, freed at the end of B or BW), and
        `cm.last_memory` its peak per device, in bytes: compare with
        `fxpipe.simulate(cm.plan).peak_memory`.
        """
        if not isinstance(measure_memory, bool):
            raise RuntimeMismatchError(f"measure_memory must be True or False, got {measure_memory!r}")
        if trace is not None:
            _check_writable(trace, "trace")  # before the step: a failed write after it would leave .grad updated
        if not self.plan.train:
            raise PlanError("this model was compiled from an inference plan (train=False), which has no backward; "
                            "call it for inference, or re-plan with train=True to train")
        _check_grad_enabled()
        self._cap.check_modes(self.model)
        self._check_replicated_statistics()
        if not callable(loss_fn):
            raise RuntimeMismatchError(f"loss_fn must be callable as loss_fn(output, target) -> scalar tensor, "
                                       f"got {type(loss_fn).__name__} {loss_fn!r}; e.g. loss_fn=torch.nn.functional.mse_loss")
        if isinstance(loss_fn, type):  # loss_fn=nn.CrossEntropyLoss: calling it builds a module, it fails deep inside
            raise RuntimeMismatchError(f"loss_fn is the class {loss_fn.__name__}, not a loss: pass an instance, "
                                       f"e.g. loss_fn={loss_fn.__name__}()")
        # The workers set their own thread counts; the driver thread computes with one so that
        # its OpenMP team does not spin-wait on the cores the workers need after its last
        # parallel region (MKL's default block time is 200 ms: a whole small step).
        prev = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return self._step(args, kwargs, target, loss_fn, trace, measure_memory)
        finally:
            torch.set_num_threads(prev)

    def _step(self, args: tuple, kwargs: dict, target: Any, loss_fn: Callable, trace: str | None,
              measure_memory: bool) -> torch.Tensor:
        per_mb, sizes, b = self._split(args, kwargs)
        _check_trainable(self.model, per_mb)
        targets = _split_target(target, self.plan.microbatches, b)
        self._sync_replicas()
        state = _StepState(inputs=per_mb, train=True, targets=targets, loss_fn=self._checked_loss(loss_fn),
                           scales=[s / b for s in sizes], out_unflatten=lambda flat: _unflatten(self._cap.out_spec, flat))
        # The step's gradients land on fresh .grad tensors and are added to the old ones only once
        # every device has finished: a failed step leaves .grad (and the replicas) as they were.
        params = list(self.model.parameters())
        before = [q.grad for q in params]
        for q in params:
            q.grad = None
        try:
            self._rt.run([f for _, f in self._train_prog], state, record=trace is not None or measure_memory)
            self._reduce_replica_grads()
        except BaseException:
            for q, g in zip(params, before):
                q.grad = g
            for _, rep in self._replicas:
                rep.grad = None
            raise
        with torch.no_grad():
            for q, g in zip(params, before):
                if g is not None:
                    if q.grad is not None:
                        g.add_(q.grad.to(g.device))
                    q.grad = g
        if trace is not None or measure_memory:
            self.last_timeline = measured_timeline(state.events, len(self.devices),
                                                   _device_peak_inflight(self.plan.schedule), state.saved_bytes)
            self.last_memory = self.last_timeline.peak_memory
        if trace is not None:
            _write_json_atomically(trace, self.last_timeline.to_chrome_trace(), "trace file")
        last = self.devices[self.plan.stages[-1].device]
        return sum(l.detach().to(last) for l in state.losses.values())

    def _checked_loss(self, loss_fn: Callable[[Any, Any], torch.Tensor]) -> Callable[[Any, Any], torch.Tensor]:
        """`loss_fn` wrapped so that its failures name the stage, device and instruction."""
        last = self.plan.stages[-1]
        d = last.device
        rt = self._rt
        name = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__

        def where() -> str:
            return (f"on the last stage (stage {last.index}, device {d} {self.plan.cluster.devices[d].name!r}) "
                    f"while running {rt.current[d]}")

        def checked(output: Any, target: Any) -> torch.Tensor:
            try:
                loss = loss_fn(output, target)
            except Exception as e:
                raise RuntimeMismatchError(
                    f"loss_fn {name} raised {type(e).__name__}: {e} {where()}; it is called once per microbatch "
                    f"with the model's output for that microbatch and its slice of target"
                    f"{' (target is None: step(..., target=None))' if target is None else ''}. The step was undone "
                    "(.grad is as before): fix loss_fn and call step again") from e
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                got = f"a tensor of shape {tuple(loss.shape)}" if isinstance(loss, torch.Tensor) else type(loss).__name__
                raise RuntimeMismatchError(
                    f"loss_fn {name} returned {got} {where()}; it must return a scalar tensor: reduce it inside "
                    "loss_fn (e.g. .mean() over the microbatch's samples)")
            if torch.is_grad_enabled() and not loss.requires_grad:
                outs = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor)]
                if outs and not any(t.requires_grad for t in outs):  # not loss_fn's doing
                    raise RuntimeMismatchError(
                        f"the model's output does not require grad {where()}: it depends on no parameter that "
                        "requires grad (the forward detaches it, computes it under torch.no_grad, or from buffers "
                        "only), so there is nothing to train through it; use the compiled model for inference")
                raise RuntimeMismatchError(
                    f"loss_fn {name} returned a tensor that does not require grad {where()}: it was detached "
                    "(.item(), .detach(), torch.no_grad or a new tensor); compute it from the model's output with torch ops")
            return loss

        return checked

    # ---- the nn.Module-like surface ----------------------------------------------------
    # The model's own methods, with their arguments (recurse=, prefix=, keep_vars=), so code
    # written for an nn.Module runs unchanged on the compiled one.
    def parameters(self, *args: Any, **kwargs: Any) -> Iterator[nn.Parameter]:
        return self.model.parameters(*args, **kwargs)

    def named_parameters(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, nn.Parameter]]:
        return self.model.named_parameters(*args, **kwargs)

    def buffers(self, *args: Any, **kwargs: Any) -> Iterator[torch.Tensor]:
        """The model's buffers (BatchNorm statistics live on their stage's device)."""
        return self.model.buffers(*args, **kwargs)

    def named_buffers(self, *args: Any, **kwargs: Any) -> Iterator[tuple[str, torch.Tensor]]:
        return self.model.named_buffers(*args, **kwargs)

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return self.model.state_dict(*args, **kwargs)

    def train(self, mode: bool = True) -> "CompiledModel":
        """`model.train(mode)`: nn.Dropout / BatchNorm that fx calls as modules follow the mode
        per call; where the graph fixed a mode (export captures, an fx-traced forward reading
        `self.training`, fused dropout) a call in another mode is refused (`Captured.check_modes`)."""
        self.model.train(mode)
        return self

    def eval(self) -> "CompiledModel":
        """`model.eval()`; see `train`."""
        return self.train(False)

    @property
    def training(self) -> bool:
        """The model's train/eval mode."""
        return self.model.training

    def load_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> Any:
        res = self.model.load_state_dict(sd, strict=strict)
        self._sync_replicas()
        return res

    def save_checkpoint(self, folder: str | os.PathLike) -> None:
        """Write a checkpoint folder (one shard file + index, runtime/checkpoint.py) that any
        plan loads, local or distributed, whatever its device count."""
        from fxpipe.runtime.checkpoint import save_model

        save_model(self.model, folder, self.plan.fingerprint, len(self.devices))

    def load_checkpoint(self, folder: str | os.PathLike) -> None:
        """Load a checkpoint saved under any plan (refused when it is of another model)."""
        from fxpipe.runtime.checkpoint import load_into_model

        load_into_model(self.model, folder, self.plan.fingerprint)
        self._sync_replicas()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.model.zero_grad(set_to_none=set_to_none)

    def code(self, device: int, train: bool = True) -> str:
        """The generated program device `device` runs (training step, or inference)."""
        progs = self._train_prog if train else self._infer_prog
        if not (isinstance(device, int) and 0 <= device < len(progs)):
            raise PlanError(f"device {device!r} does not exist; this plan has devices 0..{len(progs) - 1}")
        return progs[device][0]

    def stage_code(self, stage: int) -> str:
        """The fx-generated forward of one stage."""
        n = len(self.stage_graphs)
        if not (isinstance(stage, int) and 0 <= stage < n):  # not list indexing: -1 or 7 is a mistake here
            raise PlanError(f"stage {stage!r} does not exist; this plan has stages 0..{n - 1}")
        return self.stage_graphs[stage].code()

    @property
    def schedule(self):
        return self.plan.schedule

    def __repr__(self) -> str:
        return f"CompiledModel({type(self.model).__name__}, {self.plan.num_stages} stages, {self.plan.microbatches} microbatches)"

    def __reduce_ex__(self, protocol: Any) -> Any:
        # pickle and copy.copy come here (copy.deepcopy via __deepcopy__); the default fails deep inside on a lock
        raise FxpipeError(
            "a CompiledModel cannot be pickled or copied: it holds worker threads, locks and stage modules "
            "bound to devices. Copy or save the model instead: copy.deepcopy(cm.model) (then fxpipe.compile(copy, "
            "plan=cm.plan, example_inputs=...) for a second pipeline), torch.save(cm.state_dict(), path) or "
            "cm.save_checkpoint(folder)")

    def __deepcopy__(self, memo: dict) -> Any:
        self.__reduce_ex__(4)


def _runnable_device(d: Device, i: int) -> torch.device:
    """The torch device a plan's device runs on here; PlanError when it cannot run on this machine."""
    offline = ("a plan for devices that are not on this machine (a cluster file, 'meta') can be inspected "
               "(`fxpipe inspect`) but not run; re-plan for this machine's devices, e.g. devices=['cpu', 'cpu']")
    if d.kind == "meta":
        raise PlanError(f"plan device {i} ({d.name!r}) is a 'meta' device: {offline}")
    try:
        dev = torch.device(d.name)
    except RuntimeError:
        if d.kind == "cpu":
            return torch.device("cpu")  # a CPU worker's name is only a label ("cpu-big")
        raise PlanError(f"plan device {i} ({d.name!r}, kind {d.kind}) is not a torch device: {offline}") from None
    if dev.type != d.kind:
        raise PlanError(f"plan device {i} is named {d.name!r} but has kind {d.kind!r}: {offline}")
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            raise PlanError(f"plan device {i} ({d.name!r}) does not exist: this machine has {n} CUDA device(s); {offline}")
    return dev


class _NoBackward(torch.autograd.Function):
    """Gives an output of `cm(x)` the grad_fn eager's output would have, whose backward says
    how to train instead of torch's "element 0 of tensors does not require grad". The output
    is marked dirty, not viewed or copied: no memory, and in-place use of it stays legal."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(out)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: Any) -> Any:
        raise RuntimeMismatchError(
            "backward through the output of cm(x): a compiled model's call is pipelined inference and keeps no "
            "autograd graph (the activations live in the pipeline's stages); train with "
            "cm.step(x, target=t, loss_fn=...), which runs forward and backward through the pipeline and puts the "
            "gradients in .grad as loss_fn(model(x), t).backward() would")


def _inference_outputs(flat: list[Any], model: nn.Module, args: tuple, kwargs: dict) -> list[Any]:
    """The call's outputs; where eager's would require grad (grad mode on, a trainable
    parameter or input), floating outputs get `_NoBackward` so that `.backward()` on them
    fails clearly instead of silently or with torch's generic message."""
    if not torch.is_grad_enabled() or torch.is_inference_mode_enabled():
        return flat
    inputs = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    if not (any(p.requires_grad for p in model.parameters()) or any(t.requires_grad for t in inputs)):
        return flat
    anchor = torch.zeros((), requires_grad=True)
    mine = {id(t) for t in inputs} | {id(t) for t in model.buffers()}  # a buffer returned as is stays one

    def mark(t: Any) -> Any:
        # only tensors the pipeline made: not a user's input, a view of one, or a parameter
        if (isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_complex()) and not t.requires_grad
                and t._base is None and id(t) not in mine and not isinstance(t, nn.Parameter)):
            return _NoBackward.apply(t, anchor)
        return t

    return [pytree.tree_map(mark, v) for v in flat]


def _concat(vals: list[Any], sizes: list[int]) -> Any:
    v0 = vals[0]
    if isinstance(v0, torch.Tensor):
        if v0.dim() > 0 and all(v.shape[0] == s for v, s in zip(vals, sizes)):
            return torch.cat([v.to(v0.device) for v in vals], 0)
        if len(vals) == 1:
            return v0
        if v0.dim() == 0 and v0.is_floating_point():
            # a scalar the model reduces itself (an HF `loss`): the per-sample-mean contract of
            # `step` applies, so weight each microbatch by its share of the batch
            return sum(v.to(v0.device) * n for v, n in zip(vals, sizes)) / sum(sizes)
        raise RuntimeMismatchError(
            f"an output of shape {tuple(v0.shape)} has no batch dimension, so microbatch results cannot be "
            "concatenated; return per-sample outputs (batch first) from the model")
    return v0  # constants are the same for every microbatch


def _unflatten(spec: pytree.TreeSpec, flat: list) -> Any:
    out = pytree.tree_unflatten(flat, spec)
    # fx hands out immutable containers; users expect the ordinary ones
    from torch.fx.immutable_collections import immutable_dict, immutable_list

    if isinstance(out, immutable_dict):
        return dict(out)
    if isinstance(out, immutable_list):
        return list(out)
    return out


def _check_like_planned(cap: Captured, flat: Sequence[torch.Tensor]) -> None:
    """RuntimeMismatchError unless the call's tensor inputs have the planned dtypes and shapes
    but for dim 0: the stages and boundary buffers are built for them (both backends)."""
    vals = {n.target: n.meta.get("fxpipe.val") for n in cap.gm.graph.nodes if n.op == "placeholder"}
    for name, t in zip(cap.input_names, flat):
        ref = vals.get(name)
        if isinstance(ref, torch.Tensor) and (t.dtype != ref.dtype or tuple(t.shape[1:]) != tuple(ref.shape[1:])):
            raise RuntimeMismatchError(
                f"input {name!r} has shape {tuple(t.shape)} and dtype {t.dtype}, but the plan was made for "
                f"(batch, {', '.join(map(str, ref.shape[1:]))}) of {ref.dtype}; only the batch size may change: "
                "recompile for new shapes")


def _check_grad_enabled() -> None:
    """Refuse a training step under torch.no_grad / inference_mode before any work. Grad mode
    is thread-local, so the workers would otherwise compute and accumulate gradients anyway,
    where eager's `loss.backward()` in the same place raises."""
    if torch.is_inference_mode_enabled():
        ctx = "torch.inference_mode()"
    elif not torch.is_grad_enabled():
        ctx = "torch.no_grad() (or torch.set_grad_enabled(False))"
    else:
        return
    raise RuntimeMismatchError(
        f"step is a training step (forward and backward), but it was called under {ctx}, where gradients are "
        "disabled (eager's loss.backward() fails there too); call step outside that context, or for an evaluation "
        "loss without gradients call the model instead: loss_fn(cm(x), target)")


def _check_trainable(model: nn.Module, inputs: list[list[Any]]) -> None:
    """Refuse a training step with nothing to train before it runs: otherwise the loss is
    found not to require grad on the last stage and the error blames loss_fn."""
    if any(q.requires_grad for q in model.parameters()):
        return
    if any(isinstance(t, torch.Tensor) and t.requires_grad for mb in inputs for t in mb):
        return  # gradients of the inputs are wanted
    n = len(list(model.parameters()))
    what = "has no parameters" if n == 0 else f"has {n} parameters and none of them requires grad"
    raise RuntimeMismatchError(
        f"step: {type(model).__name__} {what}, so a training step has nothing to train (no gradient to compute); "
        "call the compiled model for inference instead (cm(x)), or set requires_grad=True on the parameters "
        "you want to train")


def _refuse_meta_model(model: Any) -> None:
    """The local runtime runs the model's own tensors: a model on the meta device has none.
    Said before planning too, which can take minutes on a large model."""
    if isinstance(model, nn.Module) and any(t.is_meta for t in model.parameters()):
        raise PlanError("the model's parameters are on the meta device: materialize them (e.g. load a state dict) "
                        "before compiling, or use fxpipe.plan for offline planning (backend='distributed' "
                        "compiles a meta model, each rank allocating its own stages)")


def _split_target(target: Any, m: int, batch: int) -> list[Any]:
    """Per microbatch, `target` split along dim 0 like the inputs. None (the whole target or
    an entry of a structure) reaches every microbatch's loss_fn as None: a loss that needs no
    target (a language model predicting its own inputs) passes target=None."""
    leaves, spec = pytree.tree_flatten(target)
    parts = []
    for t in leaves:
        if t is None:
            parts.append([None] * m)
            continue
        if not isinstance(t, torch.Tensor) or t.dim() == 0 or t.shape[0] != batch:
            got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise RuntimeMismatchError(
                f"target must be a tensor (or a structure of tensors) with the batch size {batch} as dim 0, "
                f"got {got}; give one target per input sample, split along dim 0 like the inputs (or None where "
                "loss_fn needs no target)")
        parts.append(torch.tensor_split(t, m))
    return [pytree.tree_unflatten([p[i] for p in parts], spec) for i in range(m)]


def _check_writable(path: Any, what: str) -> None:
    """FxpipeError unless `path` names a file that can be created: a str or PathLike (not a
    folder) whose folder exists. Checked before work whose result would otherwise be lost."""
    if not isinstance(path, (str, os.PathLike)):
        raise FxpipeError(f"{what} must be a file path such as 'run.json', got {type(path).__name__} {path!r}")
    folder = os.path.dirname(os.fspath(path)) or "."
    if os.path.isdir(path) or not os.path.isdir(folder):
        why = "it is a folder" if os.path.isdir(path) else f"folder {folder} does not exist"
        raise FxpipeError(f"cannot write {what} file {os.fspath(path)}: {why}; give a file path in an existing folder")


def _write_json_atomically(path: str | os.PathLike, data: Any, what: str) -> None:
    """Write JSON via a temporary file: no half-written file is ever left behind."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise FxpipeError(f"cannot write {what} {path}: {e.strerror or e}; check that the folder exists and is writable") from None
