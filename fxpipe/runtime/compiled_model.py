"""`CompiledModel`: the local backend's user-facing model (one process, a worker thread per device).

Built by `fxpipe.compile(..., backend="local")` (api.py): places the model's parameters on
their stages' devices (tied weights become replicas kept in sync), generates each device's
program and runs it on a `LocalRuntime` (runtime/local.py), for inference (`__call__`) and
training steps (`step`). Kept apart from api.py, which holds only the entry points, so the
entry points read on one screen and this class reads next to its runtime. Also here: the
checks that a plan's devices and the model can run in this process (`_runnable_device`,
`_refuse_meta_model`, also used by `compile` before planning) and the trace file writing
of `step(trace=...)`.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Iterator

import torch
from torch import nn

from fxpipe.compiler.capture import Captured
from fxpipe.compiler.cluster import Device
from fxpipe.compiler.pipeline import Compilation, microbatch_sizes
from fxpipe.compiler.plan import Plan
from fxpipe.compiler.stateful import check_shared_statistics, shared_buffer_writes
from fxpipe.errors import FxpipeError, PlanError, RuntimeMismatchError
from fxpipe.passes.emit_schedule import emit_schedule
from fxpipe.passes.simulate_schedule import Timeline, _device_peak_inflight
from fxpipe.passes.split_stages import StageGraph, build_stage_module, resolve_attr, split_stages
from fxpipe.runtime.batching import _concat, _inference_outputs, _split_target, _unflatten
from fxpipe.runtime.call_checks import _check_grad_enabled, _check_like_planned, _check_trainable, _checked_loss_fn
from fxpipe.runtime.local import LocalRuntime, StageRunner, _StepState, measured_timeline
from fxpipe.runtime.offload import keep_weights_on_host
from fxpipe.runtime.program import compile_program
from fxpipe.runtime.weight_grad import with_split_backward

__all__ = ["CompiledModel"]


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

        return _checked_loss_fn(loss_fn, name, where)

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



def _refuse_meta_model(model: Any) -> None:
    """The local runtime runs the model's own tensors: a model on the meta device has none.
    Said before planning too, which can take minutes on a large model."""
    if isinstance(model, nn.Module) and any(t.is_meta for t in model.parameters()):
        raise PlanError("the model's parameters are on the meta device: materialize them (e.g. load a state dict) "
                        "before compiling, or use fxpipe.plan for offline planning (backend='distributed' "
                        "compiles a meta model, each rank allocating its own stages)")



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
