"""`DistributedCompiledModel`: a plan run with one rank per device on torch.distributed.

Launch the same script on every rank (torchrun semantics): each rank plans the same way
(or loads the same plan file), builds only the stages placed on it
(`plan.stages[s].device == rank`) and runs its device's generated program against a
`DistRuntime` (runtime/distributed.py). Every rank is called with the same arguments; stages
read the model inputs they need locally, so inputs never travel.

    >>> comp = build_plan(model, ["cpu", "cpu"], (x,), microbatches=4)        # doctest: +SKIP
    >>> cm = DistributedCompiledModel(model, comp, timeout=60)               # doctest: +SKIP
    >>> loss = cm.step(x, target=t, loss_fn=F.mse_loss)  # on every rank    # doctest: +SKIP

Contracts:
* `step` returns the loss on every rank (broadcast from the last stage's rank); the
  gradients of this rank's parameters equal the untouched model's. A parameter used by
  stages on several ranks (tied embeddings) gets its gradient summed across those ranks
  (all_reduce on a subgroup of exactly those ranks) before `step` returns, so its copies
  stay equal under any deterministic optimizer.
* `parameters()` / `buffers()` are this rank's stages' parameters / buffers only (feed the
  parameters to the optimizer); they and their named_ forms take nn.Module's arguments
  (recurse=, prefix=, remove_duplicate=) as on the local CompiledModel.
* `state_dict(prefix=, keep_vars=, destination=)` gathers the original keys to rank 0 (each
  tensor from the lowest rank whose stages use it; tensors no stage uses from rank 0); the
  other ranks get `{}`.
* `__call__` (inference) returns the model's output on every rank.
* `load_state_dict(sd)` is called on every rank with the same full state dict; each rank
  copies in only the tensors its stages use.
* `save_checkpoint(folder)` / `load_checkpoint(folder)` (runtime/checkpoint.py): one file
  per rank plus an index; a checkpoint loads under any plan and device count, or outside a
  pipeline with `fxpipe.load_checkpoint(folder)`.
* A model built on the meta device (`with torch.device("meta"): model = Net()`) compiles:
  each rank allocates only its own stages' tensors (uninitialized) and `load_checkpoint` /
  `load_state_dict` fills them, so no rank ever holds the whole model. Non-persistent meta
  buffers (not in any state dict) are refused at compile time with their names.
* Ranks must agree: compile compares the traced model, example input shapes, plan and a
  sample of the weights (differing weights block step/call until a load); every step/call
  compares the call (kind, input shapes, every module's train/eval mode, frozen parameters)
  and whether each rank's own checks passed, so a mismatch or any rank's refusal is an error
  on every rank, and a rank that never calls fails the others within `timeout`.
* Train/eval and BatchNorm as in the local runtime: modes the graph fixed are checked per
  call (`Captured.check_modes`); a module used by several stages is refused in a call that
  would update its running statistics; other buffers are updated once per microbatch in
  order on the rank owning their stage.
* A loss_fn failure on the last rank (raises, returns a non-scalar, a non-tensor or a
  detached tensor) is the same RuntimeMismatchError on every rank, `.grad` is as before on
  every rank and the model stays usable, as in the local runtime.
* After a PipelineFailure (dead or hung peer, or any other failure midway through a step)
  the process group is unusable: later calls on this rank are refused; exit the process
  (torchrun restarts the job).

The model's parts by concern: the cross-rank agreement (plan and per-call checks, failures
spread to every rank) is the mixin in runtime/rank_agreement.py; this rank's tensors (meta
materialization, state dict, sharded checkpoints) the mixin in runtime/rank_state.py; the
static message layouts runtime/boundary_shapes.py.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn

from fxpipe.compiler.pipeline import Compilation, microbatch_sizes
from fxpipe.compiler.stateful import check_shared_statistics, shared_buffer_writes
from fxpipe.errors import PlanError, RuntimeMismatchError
from fxpipe.passes.emit_schedule import emit_schedule
from fxpipe.passes.propagate_shapes import VAL
from fxpipe.passes.split_stages import build_stage_module, resolve_attr, split_stages
from fxpipe.runtime.batching import _concat, _inference_outputs, _split_target, _unflatten
from fxpipe.runtime.boundary_shapes import BoundaryShapes
from fxpipe.runtime.call_checks import _check_grad_enabled, _check_like_planned, _check_trainable, _checked_loss_fn
from fxpipe.runtime.checkpoint import tensor_table
from fxpipe.runtime.distributed import DistRuntime, PipelineFailure, requires_grad_flow
from fxpipe.runtime.local import StageRunner, _StepState, _draws_random
from fxpipe.runtime.seeded_rng import seed_random_ops
from fxpipe.runtime.offload import keep_weights_on_host
from fxpipe.runtime.program import compile_program
from fxpipe.runtime.rank_agreement import RankAgreement
from fxpipe.runtime.rank_state import RankState
from fxpipe.runtime.weight_grad import with_split_backward

__all__ = ["DistributedCompiledModel", "PipelineFailure", "check_launch"]


def _runnable(name: str, kind: str) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        if kind != "cuda":
            raise PlanError(f"plan device {name!r} (kind {kind}) is not a torch device this rank can run on") from None
        # a described cluster's GPU (Cluster.preset names them 'h100:3'): under torchrun a rank
        # runs on its node's GPU number LOCAL_RANK, the usual one-rank-per-GPU mapping
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            run_as = f" (run as {dev})" if n else ""
            raise PlanError(f"plan device {name!r}{run_as} does not exist on this rank's machine ({n} CUDA "
                            "devices): run the plan on the cluster it was made for, one rank per GPU, or plan for "
                            "this machine's devices (e.g. devices=['cpu'] * nproc_per_node)")
    elif dev.type == "meta":
        raise PlanError(f"plan device {name!r} is a 'meta' device: such a plan can be inspected, not run")
    return dev



def check_launch(n: int) -> tuple[int, int]:
    """(world size, rank) for a plan of n devices, or a clear error when this process was not
    launched as one of n ranks. `compile(backend="distributed")` calls it before planning, so
    `python script.py` without torchrun fails at once instead of after planning the model."""
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
        env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
        missing = [k for k, v in env.items() if v is None]
        if missing:
            script = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0].endswith(".py") else "script.py"
            raise RuntimeMismatchError(
                f"the distributed backend needs torch.distributed: no process group is initialized and "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; launch with "
                f"`torchrun --nproc_per_node={n} {script}` or call torch.distributed.init_process_group first")
        world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
    DistributedCompiledModel._check_world(world, n)
    return world, rank


def _check_no_autocast(what: str) -> None:
    """Refuse a call under torch.autocast (the local runtime supports it): boundary messages are
    laid out from the plan's dtypes, and autocast changes them (a bf16 linear output where the
    plan says fp32), which used to fail midway and lose the process group."""
    from fxpipe.runtime.local import _caller_autocast

    if _caller_autocast():
        raise RuntimeMismatchError(
            f"{what} was called under torch.autocast, which the distributed backend does not support (its boundary "
            "messages are laid out from the plan's dtypes, and autocast changes them): call it outside autocast, "
            "cast the model and inputs instead (model.to(torch.bfloat16) before compiling), or use backend='local'")


def _params_of(obj: Any) -> list[torch.Tensor]:
    """The parameters a stage's module or attribute target holds."""
    if isinstance(obj, nn.Module):
        return list(obj.parameters())
    return [obj] if isinstance(obj, nn.Parameter) else []

class DistributedCompiledModel(RankAgreement, RankState):
    """One rank's share of a pipelined model (see the module docstring).

    Args:
        model: the whole model, the same on every rank (same seed or same state dict).
        comp: the Compilation from `build_plan`/`build_from_plan`, made the same way on every rank.
        timeout: seconds a rank waits on any one message or collective before failing.
        backend: "gloo" or "nccl"; default: nccl for CUDA plans, gloo otherwise. Used only
            when this constructor initializes the process group (from torchrun's environment).
        prefetch: receives posted ahead per peer (default 4 on gloo, 0 on NCCL).
        threads: intra-op threads this rank computes with during a step (default: the plan
            device's `threads`, i.e. the machine's cores shared among the plan's CPU devices).
        rebuild: plan -> Compilation of this model under that plan (`compile` passes it when
            it planned): a rank whose own planning differs from rank 0's adopts rank 0's plan.
    """

    def __init__(self, model: nn.Module, comp: Compilation, timeout: float = 300.0, backend: str | None = None,
                 prefetch: int | None = None, threads: int | None = None,
                 rebuild: Callable[[Any], Compilation] | None = None):
        if not (isinstance(timeout, (int, float)) and not isinstance(timeout, bool) and timeout > 0):
            raise PlanError(f"timeout must be a positive number of seconds, got {timeout!r}")
        self.model = model
        self.plan = p = comp.plan
        self._cap = comp.captured
        self.timeout = float(timeout)
        devs = p.cluster.devices
        n = len(devs)
        cuda = any(_runnable(d.name, d.kind).type == "cuda" for d in devs if d.kind != "cpu")
        backend = backend or ("nccl" if cuda else "gloo")
        # ---- the world: refused before any rendezvous when it cannot fit the plan -------
        world, rank = check_launch(n)
        if not dist.is_initialized():
            if cuda:
                torch.cuda.set_device(_runnable(devs[rank].name, devs[rank].kind))
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=self.timeout))
        self.rank, self.world = rank, world
        self.device = _runnable(devs[rank].name, devs[rank].kind)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # control messages (plan check, call check, loss) go over gloo on the host, on a group of
        # fxpipe's own: a process group the user initialized keeps its own timeout (30 min by
        # default), and every fxpipe collective must fail within `timeout` instead
        self._ctrl = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
        # host-side data collectives (outputs, state gather) use it too on gloo; NCCL needs device buffers
        self._data = self._ctrl if dist.get_backend() == "gloo" else None
        self._values_differ: str | None = None  # set by _check_same_plan, cleared by a load
        self._broken: str | None = None  # why a step/call/collective failed midway (see _check_usable)
        self._table = tensor_table(model)
        self._rebuild = rebuild
        self._check_same_plan()  # may replace self.plan and self._cap by rank 0's
        p, devs = self.plan, self.plan.cluster.devices
        if _runnable(devs[rank].name, devs[rank].kind) != self.device:  # rank 0's plan placed devices otherwise
            self.device = _runnable(devs[rank].name, devs[rank].kind)
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)

        # ---- stages of this rank --------------------------------------------------------
        self.stage_graphs = split_stages(self._cap.gm, [s.units for s in p.stages])
        self.stage_rank = [s.device for s in p.stages]
        self.local_stages = [s for s, r in enumerate(self.stage_rank) if r == rank]
        users: dict[int, set[int]] = {}  # id(tensor) -> ranks whose stages use it
        stages_of: dict[int, set[int]] = {}  # id(tensor) -> stages that use it
        tensors: dict[int, torch.Tensor] = {}
        modules: list[tuple[nn.Module, list[torch.Tensor]]] = []
        for s, (sg, r) in enumerate(zip(self.stage_graphs, self.stage_rank)):
            for target in sg.attrs + sg.modules:
                obj = resolve_attr(model, self._cap.gm, target)
                ts = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else \
                    [obj] if isinstance(obj, torch.Tensor) else []
                if isinstance(obj, nn.Module):
                    modules.append((obj, ts))
                for t in ts:
                    users.setdefault(id(t), set()).add(r)
                    stages_of.setdefault(id(t), set()).add(s)
                    tensors[id(t)] = t
        self._users = users
        # modules more than one stage uses (the local runtime's module replicas): on other ranks
        # their buffers are other tensors, on one rank updated stage after stage, not in eager's
        # order; `check_shared_statistics` refuses calls that would update their statistics
        self._shared_modules = list({id(m): m for m, ts in modules
                                     if any(len(stages_of[id(t)]) > 1 for t in ts)}.values())
        self._shared_writes = shared_buffer_writes(self._cap.gm, [s.units for s in p.stages],
                                                   [sg.attrs for sg in self.stage_graphs])
        self._unloaded: set[int] = set()  # ids of tensors materialized from meta, not yet loaded
        self._check_offload_sharing(model, p)
        # parameters of this rank's offloaded stages get host memory, never the device's
        self._host_ids = {id(t) for s in self.local_stages if getattr(p.stages[s], "offload", False)
                          for target in self.stage_graphs[s].attrs + self.stage_graphs[s].modules
                          for t in _params_of(resolve_attr(model, self._cap.gm, target))}
        self._materialize(tensors)
        split_bwd = any(i.op.name in ("BWD_INPUT", "BWD_WEIGHT") for prog in p.schedule.programs for i in prog)
        runners: list[StageRunner | None] = [None] * len(self.stage_graphs)
        moved: set[int] = set()
        for s in self.local_stages:
            sg = self.stage_graphs[s]
            offload = bool(getattr(p.stages[s], "offload", False))
            objects: dict[str, Any] = {}
            for target in sg.attrs + sg.modules:
                obj = resolve_attr(model, self._cap.gm, target)
                # an offloaded stage's parameters never visit the device whole (runtime/offload.py)
                objects[target] = obj if offload else self._move(obj, moved)
            if offload:
                keep_weights_on_host(objects, self.device)
            module = build_stage_module(sg, objects, self.device)
            positions = tuple(self._cap.input_names.index(x) for x in sg.model_inputs)
            r = StageRunner(s, module, self.device, rank, len(sg.recv), positions, s == len(self.stage_graphs) - 1,
                            recompute=p.stages[s].recompute, offload=offload)
            runners[s] = with_split_backward(r) if split_bwd else r
        # tied parameters across ranks: one subgroup per set of ranks (created by every rank, same order)
        self._tied: list[tuple[Any, list[nn.Parameter]]] = []
        named = dict(model.named_parameters())
        by_ranks: dict[tuple[int, ...], list[nn.Parameter]] = {}
        for _, q in named.items():
            rs = tuple(sorted(users.get(id(q), ())))
            if len(rs) > 1 and q.requires_grad:
                by_ranks.setdefault(rs, []).append(q)
        for rs in sorted(by_ranks):
            g = dist.new_group(list(rs), timeout=datetime.timedelta(seconds=self.timeout))
            if rank in rs:
                self._tied.append((g, by_ranks[rs]))

        if threads is None:
            threads = max(1, int(getattr(devs[rank], "threads", 1) or 1))
        elif not isinstance(threads, int) or isinstance(threads, bool) or threads < 1:
            raise PlanError(f"threads must be a positive integer, got {threads!r}")
        seeded = self._seed_random_stages(runners)
        self._shapes = BoundaryShapes(self._cap, p.microbatches, self.stage_graphs)  # static message layouts
        self._rt = DistRuntime(runners, rank, world, self.stage_rank, self._shapes.layout, self.device, group=None,
                               threads=threads, timeout=self.timeout,
                               prefetch=(4 if dist.get_backend() == "gloo" else 0) if prefetch is None else prefetch,
                               seeded=seeded)
        names = [d.name for d in devs]
        self._train_sched = p.schedule
        self._train_prog = compile_program(p.schedule, rank, names)
        self._infer_sched = emit_schedule("forward", p.num_stages, p.microbatches, stage_device=p.schedule.stage_device,
                                          train=False)
        self._infer_prog = compile_program(self._infer_sched, rank, names)
        self._grad_flags: dict[tuple[bool, ...], dict[str, bool]] = {}

    def _seed_random_stages(self, runners: list[StageRunner | None]) -> bool:
        """Dropout as in the local runtime: where random-drawing stages sit on two or more CPU
        devices of the plan, their random ops draw from a generator per (stage, microbatch),
        seeded from one base seed per call drawn from the caller's generator (`run_program`), so
        a seeded step draws the local runtime's masks (before: each rank's own generator, loss
        1.1575 where the local backend gave 1.1530). Decided over every stage of the plan (not
        only this rank's), as the local runtime decides over its workers; the same on every rank."""
        devs = self.plan.cluster.devices

        def draws(sg: Any) -> bool:  # the stage's graph over the model's own objects (no device move)
            objs = {t: resolve_attr(self.model, self._cap.gm, t) for t in sg.attrs + sg.modules}
            return _draws_random(fx.GraphModule(objs, sg.graph))

        drawing = {self.stage_rank[s] for s, sg in enumerate(self.stage_graphs)
                   if devs[self.stage_rank[s]].kind == "cpu" and draws(sg)}
        if len(drawing) < 2:
            return False
        for r in runners:
            if r is not None and r.device.type == "cpu" and r.uses_rng:
                seed_random_ops(r.module)
        return True

    # ---- checks ------------------------------------------------------------------------
    @staticmethod
    def _check_world(world: int, n: int) -> None:
        if world != n:
            raise PlanError(f"the world has {world} rank{'s' if world != 1 else ''} but the plan has {n} devices: "
                            f"the distributed backend runs one rank per plan device; launch with "
                            f"--nproc_per_node={n} (or plan for {world} devices)")

    def _check_offload_sharing(self, model: nn.Module, p: Any) -> None:
        """A tensor this rank's offloaded stages keep on the host cannot also be read on the
        device by a resident stage of the same rank: refuse that plan by name."""
        where: dict[int, tuple[str, set[bool]]] = {}
        for s in self.local_stages:
            off = bool(getattr(p.stages[s], "offload", False))
            for target in self.stage_graphs[s].attrs + self.stage_graphs[s].modules:
                obj = resolve_attr(model, self._cap.gm, target)
                for t in _params_of(obj):
                    where.setdefault(id(t), (target, set()))[1].add(off)
        mixed = sorted(name for name, flags in where.values() if len(flags) > 1)
        if mixed:
            raise PlanError(f"rank {self.rank} runs an offloaded and a resident stage that share {mixed[:3]}: the "
                            "shared weights cannot live both on the host and on the device; plan with offload='off' or "
                            "'on' for all of this device's stages")

    def _move(self, obj: Any, moved: set[int]) -> Any:
        if isinstance(obj, nn.Module):
            return obj.to(self.device)
        if isinstance(obj, torch.Tensor) and obj.device != self.device and id(obj) not in moved:
            obj.data = obj.data.to(self.device)
            moved.add(id(obj))
        return obj

    # ---- running -----------------------------------------------------------------------
    def _split(self, args: tuple, kwargs: dict) -> tuple[list[list[torch.Tensor]], list[int], int]:
        try:
            self._cap.signature.bind(*args, **kwargs)
        except TypeError as e:
            raise RuntimeMismatchError(f"this call does not fit {type(self.model).__name__}.forward"
                                       f"{self._cap.signature}: {e}") from None
        flat = self._cap.flat_inputs(args, kwargs)
        bs = {t.shape[0] for t in flat if t.dim() > 0}
        if len(bs) != 1:
            raise RuntimeMismatchError(f"input tensors disagree on the batch size (dim 0): {sorted(bs)}")
        b = bs.pop()
        _check_like_planned(self._cap, flat)  # else a stage fails midway and the group is lost
        m = self.plan.microbatches
        sizes = microbatch_sizes(b, m)
        chunks = [torch.tensor_split(t, m) if t.dim() else [t] * m for t in flat]
        return [[c[i] for c in chunks] for i in range(m)], sizes, b

    def _boundary_grads(self, args: tuple, kwargs: dict) -> Callable[[int], list[bool]]:
        """stage -> per received value, whether it requires grad in this call (the same on
        every rank: it depends on the graph and on which inputs and parameters require grad;
        a model frozen or unfrozen between steps gets its flags again)."""
        inputs = tuple(bool(t.requires_grad) for t in self._cap.flat_inputs(args, kwargs))
        key = inputs + tuple(q.requires_grad for q in self.model.parameters())
        if key not in self._grad_flags:
            if len(self._grad_flags) > 8:  # a model toggling many freezes: keep the cache small
                self._grad_flags.clear()
            self._grad_flags[key] = requires_grad_flow(self._cap.gm, self.model, inputs, VAL)
        flags = self._grad_flags[key]
        return lambda s: [flags.get(x, True) for x in self.stage_graphs[s].recv]

    def _last_rank(self) -> int:
        return self.stage_rank[-1]

    def step(self, *args: Any, target: Any, loss_fn: Callable[[Any, Any], torch.Tensor], trace: str | None = None,
             measure_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        """One pipelined forward+backward on every rank; returns the loss on every rank.

        Same contract as `CompiledModel.step` (loss_fn is a per-sample mean over a microbatch;
        gradients accumulate into `.grad` as in eager); a failed step leaves `.grad` as it was.
        A loss_fn that raises or returns anything but a scalar tensor requiring grad (checked on
        the last rank as `CompiledModel.step` checks it) is the same RuntimeMismatchError on
        every rank, naming loss_fn and the rank; the step is undone on every rank and the model
        stays usable (the last rank finishes the step's messages with a zero stand-in loss).
        `trace` / `measure_memory` (recording a step) are the local backend's only: refused
        here by name rather than taken for model inputs, as they would be otherwise.
        """
        self._check_usable()

        def check() -> tuple[list, list[int], int, list]:
            if trace is not None or measure_memory is not False:
                raise RuntimeMismatchError(
                    "step(trace=..., measure_memory=...) records a step of the local backend only; the distributed "
                    "backend does not record steps: leave them out, or record with backend='local' on one machine")
            _check_grad_enabled()
            _check_no_autocast("step")
            if not self.plan.train:
                raise PlanError("this model was compiled from an inference plan (train=False), which has no backward")
            self._cap.check_modes(self.model)
            check_shared_statistics(self.model, self._shared_modules, self._shared_writes)
            self._check_loaded("train")
            if not callable(loss_fn) or isinstance(loss_fn, type):
                raise RuntimeMismatchError(f"loss_fn must be callable as loss_fn(output, target) -> scalar tensor "
                                           f"(an instance, not a class), got {loss_fn!r}")
            per_mb, sizes, b = self._split(args, kwargs)
            _check_trainable(self.model, per_mb)  # the whole model's flags: every rank decides alike
            return per_mb, sizes, b, _split_target(target, self.plan.microbatches, b)

        # every rank checks, then all agree before any message: a refusal is raised on every rank
        per_mb, sizes, b, targets = self._agree_on_call("step", args, kwargs, check)
        self._rt.needs_grad = self._boundary_grads(args, kwargs)
        loss_failed: list[RuntimeMismatchError] = []  # the last rank's first loss_fn failure
        state = _StepState(inputs=per_mb, train=True, targets=targets, loss_fn=self._recovering_loss(loss_fn, loss_failed),
                           scales=[x / b for x in sizes], out_unflatten=lambda flat: _unflatten(self._cap.out_spec, flat))
        params = list(self.parameters())
        before = [q.grad for q in params]
        for q in params:
            q.grad = None
        try:
            self._rt.run_program(self._train_prog[1], self._train_sched.programs, state, sizes)
            self._reduce_tied()
            loss, failure = self._broadcast_loss(state, loss_failed)
        except BaseException as e:
            self._mark_broken(e)
            for q, g in zip(params, before):
                q.grad = g
            raise
        if failure is not None:  # every message of the step was exchanged: the group stays in step
            for q, g in zip(params, before):
                q.grad = g
            raise failure
        with torch.no_grad():
            for q, g in zip(params, before):
                if g is not None:
                    if q.grad is not None:
                        g.add_(q.grad)
                    q.grad = g
        return loss

    def _reduce_tied(self) -> None:
        for group, qs in self._tied:
            by_dtype: dict[torch.dtype, list[nn.Parameter]] = {}
            for q in qs:
                by_dtype.setdefault(q.dtype, []).append(q)
            for dtype, ps in sorted(by_dtype.items(), key=lambda kv: str(kv[0])):
                flat = torch.cat([(q.grad if q.grad is not None else torch.zeros_like(q)).reshape(-1) for q in ps])
                home = flat.device
                if home.type == "cpu" and self.device.type == "cuda" and dist.get_backend(group) == "nccl":
                    flat = flat.to(self.device)  # an offloaded stage's host gradients; NCCL reduces device memory
                ranks = sorted(self._users[id(ps[0])])
                self._collective(lambda: dist.all_reduce(flat, group=group),
                                 f"summing the gradients of parameters shared by ranks {ranks}")
                flat = flat.to(home)
                off = 0
                for q in ps:
                    q.grad = flat[off:off + q.numel()].view_as(q).clone()
                    off += q.numel()

    def _recovering_loss(self, loss_fn: Callable[[Any, Any], torch.Tensor],
                         failed: list[RuntimeMismatchError]) -> Callable[[Any, Any], torch.Tensor]:
        """`loss_fn` under the local backend's contract (`_checked_loss_fn`), that does not stop
        the step: its first failure goes to `failed` and this and every later microbatch get a
        zero stand-in loss, so the last rank still sends and receives every message of the step
        (stopping would leave its peers waiting for gradients until the timeout, with messages
        in flight that the next step's receives would take as theirs). `_broadcast_loss` then
        tells every rank, and `step` undoes the step on all of them."""
        last = self.plan.stages[-1]
        name = getattr(loss_fn, "__name__", None) or type(loss_fn).__name__

        def where() -> str:
            return (f"on the last stage (stage {last.index}, rank {self.rank}, device {self.device}) "
                    f"while running {self._rt.current[self.rank]}")

        checked = _checked_loss_fn(loss_fn, name, where)

        def run(output: Any, target: Any) -> torch.Tensor:
            if not failed:
                try:
                    return checked(output, target)
                except RuntimeMismatchError as e:
                    failed.append(e)
            outs = [t for t in pytree.tree_leaves(output) if isinstance(t, torch.Tensor) and t.requires_grad]
            # zero, and connected to the outputs: the backward sends zero gradients, as planned
            stand_in = sum((o.sum() * 0 for o in outs), torch.zeros((), device=self.device))
            return stand_in if stand_in.requires_grad else torch.zeros((), device=self.device, requires_grad=True)

        return run

    def _broadcast_loss(self, state: _StepState, failed: list[RuntimeMismatchError]
                        ) -> tuple[torch.Tensor | None, RuntimeMismatchError | None]:
        """The loss from the last rank to every rank, and whether its loss_fn failed (then the
        same error on every rank, and no loss)."""
        last = self._last_rank()
        codes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
        buf = torch.zeros(3, dtype=torch.float64)
        if self.rank == last:
            loss = sum(l.detach() for l in state.losses.values())
            buf[0] = loss.double().cpu()
            buf[1] = codes.index(loss.dtype) if loss.dtype in codes else 1
            buf[2] = 1.0 if failed else 0.0
        self._collective(lambda: dist.broadcast(buf, src=last, group=self._ctrl),
                         f"receiving the loss from rank {last}")
        if buf[2].item():
            msg = [str(failed[0]) if failed else None]
            self._collective(lambda: dist.broadcast_object_list(msg, src=last, group=self._ctrl),
                             f"learning why rank {last}'s loss_fn failed")
            err = RuntimeMismatchError(msg[0])
            if failed:
                err.__cause__ = failed[0].__cause__
            return None, err
        if self.rank == last:
            return loss, None
        return buf[0].to(codes[int(buf[1].item())]).to(self.device), None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Pipelined inference on every rank: equals `model(*args, **kwargs)` on every rank."""
        self._check_usable()

        def check() -> tuple[list, list[int], int]:
            _check_no_autocast("cm(...)")
            self._check_loaded("run inference")
            self._cap.check_modes(self.model)
            check_shared_statistics(self.model, self._shared_modules, self._shared_writes)
            return self._split(args, kwargs)

        per_mb, sizes, _ = self._agree_on_call("inference", args, kwargs, check)
        try:
            return self._infer(args, kwargs, per_mb, sizes)
        except BaseException as e:
            self._mark_broken(e)
            raise

    def _infer(self, args: tuple, kwargs: dict, per_mb: list, sizes: list[int]) -> Any:
        state = _StepState(inputs=per_mb, train=False)
        with torch.no_grad():
            self._rt.run_program(self._infer_prog[1], self._infer_sched.programs, state, sizes)
        last = self._last_rank()
        results = []
        for mb, n in enumerate(sizes):
            lay = self._shapes.layout("out", 0, n)
            if self.rank == last:
                buf = lay.pack(state.results[mb], self.device).clone()
            else:
                buf = lay.empty(self.device)
            if buf.numel():
                self._collective(lambda: dist.broadcast(buf, src=last, group=self._data),
                                 f"receiving the outputs from rank {last}")
            results.append(state.results[mb] if self.rank == last else lay.unpack(buf))
        flat = [results[0][k] if free else _concat([results[mb][k] for mb in range(len(sizes))], sizes)
                for k, free in enumerate(self._cap.batch_free_outputs())]
        return _unflatten(self._cap.out_spec, _inference_outputs(flat, self.model, args, kwargs))

    # ---- the nn.Module-like surface ----------------------------------------------------
    def _mine(self, t: torch.Tensor) -> bool:
        return self.rank in self._users.get(id(t), ())

    # The model's own arguments (recurse=, prefix=, remove_duplicate=), as on the local
    # CompiledModel, filtered to this rank's stages' tensors.
    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]:
        """This rank's stages' parameters (each once, in the model's order)."""
        return (q for q in self.model.parameters(recurse=recurse) if self._mine(q))

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, nn.Parameter]]:
        return ((k, q) for k, q in self.model.named_parameters(prefix=prefix, recurse=recurse,
                                                                remove_duplicate=remove_duplicate) if self._mine(q))

    def buffers(self, recurse: bool = True) -> Iterator[torch.Tensor]:
        """This rank's stages' buffers (BatchNorm statistics live on the rank owning the stage)."""
        return (b for b in self.model.buffers(recurse=recurse) if self._mine(b))

    def named_buffers(self, prefix: str = "", recurse: bool = True,
                      remove_duplicate: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        return ((k, b) for k, b in self.model.named_buffers(prefix=prefix, recurse=recurse,
                                                             remove_duplicate=remove_duplicate) if self._mine(b))

    def train(self, mode: bool = True) -> "DistributedCompiledModel":
        """`model.train(mode)` on this rank (call it on every rank alike, as every step)."""
        self.model.train(mode)
        return self

    def eval(self) -> "DistributedCompiledModel":
        """`model.eval()`; see `train`."""
        return self.train(False)

    @property
    def training(self) -> bool:
        """The model's train/eval mode."""
        return self.model.training

    def zero_grad(self, set_to_none: bool = True) -> None:
        for q in self.parameters():
            if set_to_none:
                q.grad = None
            elif q.grad is not None:
                q.grad.zero_()


    def code(self, train: bool = True) -> str:
        """The generated program this rank runs."""
        return (self._train_prog if train else self._infer_prog)[0]

    def __repr__(self) -> str:
        return (f"DistributedCompiledModel({type(self.model).__name__}, rank {self.rank}/{self.world}, "
                f"stages {self.local_stages} of {self.plan.num_stages})")
