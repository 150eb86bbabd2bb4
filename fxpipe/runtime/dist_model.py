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
* `parameters()` are this rank's stages' parameters only (feed them to the optimizer).
* `state_dict()` gathers the original keys to rank 0 (each tensor from the lowest rank
  whose stages use it; tensors no stage uses from rank 0); the other ranks get `{}`.
* `__call__` (inference) returns the model's output on every rank.
* `load_state_dict(sd)` is called on every rank with the same full state dict.
* After a PipelineFailure (dead or hung peer) the process group is unusable: exit the
  process (torchrun restarts the job).
"""

from __future__ import annotations

import datetime
import hashlib
import os
from typing import Any, Callable, Iterator

import torch
import torch.distributed as dist
import torch.fx as fx
from torch import nn

from fxpipe.compiler.pipeline import Compilation, microbatch_sizes
from fxpipe.errors import FxpipeError, PlanError, RuntimeMismatchError
from fxpipe.passes.emit_schedule import emit_schedule
from fxpipe.passes.propagate_shapes import VAL, propagate_shapes
from fxpipe.passes.split_stages import build_stage_module, resolve_attr, split_stages
from fxpipe.runtime.distributed import BoundaryLayout, DistRuntime, PipelineFailure, grad_layout
from fxpipe.runtime.local import StageRunner, _StepState
from fxpipe.runtime.program import compile_program
from fxpipe.runtime.weight_grad import with_split_backward

__all__ = ["DistributedCompiledModel", "PipelineFailure"]


def _runnable(name: str, kind: str) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise PlanError(f"plan device {name!r} (kind {kind}) is not a torch device this rank can run on") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= n:
            raise PlanError(f"plan device {name!r} does not exist on this rank's machine ({n} CUDA devices)")
    elif dev.type == "meta":
        raise PlanError(f"plan device {name!r} is a 'meta' device: such a plan can be inspected, not run")
    return dev


class DistributedCompiledModel:
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
    """

    def __init__(self, model: nn.Module, comp: Compilation, timeout: float = 300.0, backend: str | None = None,
                 prefetch: int | None = None, threads: int | None = None):
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
        if dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
            self._check_world(world, n)
        else:
            env = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
            missing = [k for k, v in env.items() if v is None]
            if missing:
                raise RuntimeMismatchError(
                    f"the distributed backend needs torch.distributed: no process group is initialized and "
                    f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; launch with "
                    f"`torchrun --nproc_per_node={n} script.py` or call torch.distributed.init_process_group first")
            world, rank = int(env["WORLD_SIZE"]), int(env["RANK"])
            self._check_world(world, n)
            if cuda:
                torch.cuda.set_device(_runnable(devs[rank].name, devs[rank].kind))
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=datetime.timedelta(seconds=self.timeout))
        self.rank, self.world = rank, world
        self.device = _runnable(devs[rank].name, devs[rank].kind)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        # control messages (plan check, loss) go over gloo on the host
        self._ctrl = None if dist.get_backend() == "gloo" else dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=self.timeout))
        self._check_same_plan()
        if any(t.is_meta for t in model.parameters()):
            raise PlanError("the model's parameters are on the meta device: materialize them before compiling")

        # ---- stages of this rank --------------------------------------------------------
        self.stage_graphs = split_stages(self._cap.gm, [s.units for s in p.stages])
        self.stage_rank = [s.device for s in p.stages]
        self.local_stages = [s for s, r in enumerate(self.stage_rank) if r == rank]
        users: dict[int, set[int]] = {}  # id(tensor) -> ranks whose stages use it
        tensors: dict[int, torch.Tensor] = {}
        for sg, r in zip(self.stage_graphs, self.stage_rank):
            for target in sg.attrs + sg.modules:
                obj = resolve_attr(model, self._cap.gm, target)
                ts = list(obj.parameters()) + list(obj.buffers()) if isinstance(obj, nn.Module) else \
                    [obj] if isinstance(obj, torch.Tensor) else []
                for t in ts:
                    users.setdefault(id(t), set()).add(r)
                    tensors[id(t)] = t
        self._users = users
        split_bwd = any(i.op.name in ("BWD_INPUT", "BWD_WEIGHT") for prog in p.schedule.programs for i in prog)
        runners: list[StageRunner | None] = [None] * len(self.stage_graphs)
        moved: set[int] = set()
        for s in self.local_stages:
            sg = self.stage_graphs[s]
            objects: dict[str, Any] = {}
            for target in sg.attrs + sg.modules:
                obj = resolve_attr(model, self._cap.gm, target)
                objects[target] = self._move(obj, moved)
            module = build_stage_module(sg, objects, self.device)
            positions = tuple(self._cap.input_names.index(x) for x in sg.model_inputs)
            r = StageRunner(s, module, self.device, rank, len(sg.recv), positions, s == len(self.stage_graphs) - 1)
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
        self._rt = DistRuntime(runners, rank, world, self.stage_rank, self._layout, self.device, group=None,
                               threads=threads, timeout=self.timeout,
                               prefetch=(4 if dist.get_backend() == "gloo" else 0) if prefetch is None else prefetch)
        names = [d.name for d in devs]
        self._train_sched = p.schedule
        self._train_prog = compile_program(p.schedule, rank, names)
        self._infer_sched = emit_schedule("forward", p.num_stages, p.microbatches, stage_device=p.schedule.stage_device,
                                          train=False)
        self._infer_prog = compile_program(self._infer_sched, rank, names)
        self._vals: dict[int, dict[str, Any]] = {}
        self._layouts: dict[tuple[str, int, int], BoundaryLayout] = {}

    # ---- checks ------------------------------------------------------------------------
    @staticmethod
    def _check_world(world: int, n: int) -> None:
        if world != n:
            raise PlanError(f"the world has {world} rank{'s' if world != 1 else ''} but the plan has {n} devices: "
                            f"the distributed backend runs one rank per plan device; launch with "
                            f"--nproc_per_node={n} (or plan for {world} devices)")

    def _plan_digest(self) -> int:
        p = self.plan
        text = repr(([s.units for s in p.stages], [s.device for s in p.stages], p.microbatches, p.schedule.kind,
                     [[str(i) for i in prog] for prog in p.schedule.programs], p.fingerprint))
        return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")

    def _check_same_plan(self) -> None:
        mine = torch.tensor([self._plan_digest()], dtype=torch.int64)
        allv = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        self._collective(lambda: dist.all_gather(allv, mine, group=self._ctrl), "checking that every rank has the same plan")
        digests = [int(v.item()) for v in allv]
        if len(set(digests)) != 1:
            groups: dict[int, list[int]] = {}
            for r, d in enumerate(digests):
                groups.setdefault(d, []).append(r)
            raise PlanError(f"the ranks planned differently (ranks grouped by plan: {sorted(groups.values())}); "
                            "planning must be the same on every rank: plan once (fxpipe.plan(...).save('plan.json')) "
                            "and give every rank that plan file")

    def _collective(self, fn: Callable[[], Any], what: str) -> Any:
        try:
            return fn()
        except FxpipeError:
            raise
        except Exception as e:
            raise PipelineFailure(f"rank {self.rank} failed while {what}: {type(e).__name__}: "
                                  f"{str(e).splitlines()[0][:300] if str(e) else ''} (a peer died or is stuck)") from None

    def _move(self, obj: Any, moved: set[int]) -> Any:
        if isinstance(obj, nn.Module):
            return obj.to(self.device)
        if isinstance(obj, torch.Tensor) and obj.device != self.device and id(obj) not in moved:
            obj.data = obj.data.to(self.device)
            moved.add(id(obj))
        return obj

    # ---- static shapes -----------------------------------------------------------------
    def _values_at(self, n: int) -> dict[str, Any]:
        """Original node name -> its meta value when a microbatch has n samples."""
        if n in self._vals:
            return self._vals[n]
        gm = self._cap.gm
        planned = microbatch_sizes(self._cap.batch_size, self.plan.microbatches)[0]
        if n == planned:
            vals = {node.name: node.meta.get(VAL) for node in gm.graph.nodes}
        else:
            g = fx.Graph()
            out = g.graph_copy(gm.graph, {})
            g.output(out)
            copy = fx.GraphModule(gm, g)
            ins = []
            for node in copy.graph.nodes:
                if node.op == "placeholder":
                    v = node.meta.get(VAL)
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        v = torch.empty((n, *v.shape[1:]), dtype=v.dtype, device="meta")
                    ins.append(v)
            propagate_shapes(copy, ins)
            vals = {node.name: node.meta.get(VAL) for node in copy.graph.nodes}
        self._vals[n] = vals
        return vals

    def _layout(self, kind: str, s: int, n: int) -> BoundaryLayout:
        """Layout of ("act", s): stage s's received values; ("grad", s): gradients of stage s's sent ones."""
        key = (kind, s, n)
        if key not in self._layouts:
            vals = self._values_at(n)
            if kind == "act":
                names = self.stage_graphs[s].recv
                self._layouts[key] = BoundaryLayout([vals[x] for x in names], f"activations into stage {s} ({n} samples)")
            elif kind == "grad":
                names = self.stage_graphs[s].send
                self._layouts[key] = grad_layout([vals[x] for x in names], f"gradients out of stage {s + 1} ({n} samples)")
            else:  # the model's flat outputs
                out = [a for a in self._cap.gm.graph.nodes if a.op == "output"][0].args[0]
                self._layouts[key] = BoundaryLayout([vals[a.name] if isinstance(a, fx.Node) else a for a in out],
                                                    f"outputs ({n} samples)")
        return self._layouts[key]

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
        m = self.plan.microbatches
        sizes = microbatch_sizes(b, m)
        chunks = [torch.tensor_split(t, m) if t.dim() else [t] * m for t in flat]
        return [[c[i] for c in chunks] for i in range(m)], sizes, b

    def _last_rank(self) -> int:
        return self.stage_rank[-1]

    def step(self, *args: Any, target: Any, loss_fn: Callable[[Any, Any], torch.Tensor], **kwargs: Any) -> torch.Tensor:
        """One pipelined forward+backward on every rank; returns the loss on every rank.

        Same contract as `CompiledModel.step` (loss_fn is a per-sample mean over a microbatch;
        gradients accumulate into `.grad` as in eager); a failed step leaves `.grad` as it was.
        """
        from fxpipe.api import _split_target, _unflatten

        if not self.plan.train:
            raise PlanError("this model was compiled from an inference plan (train=False), which has no backward")
        if not callable(loss_fn):
            raise RuntimeMismatchError(f"loss_fn must be callable as loss_fn(output, target) -> scalar tensor, "
                                       f"got {type(loss_fn).__name__}")
        per_mb, sizes, b = self._split(args, kwargs)
        targets = _split_target(target, self.plan.microbatches, b)
        state = _StepState(inputs=per_mb, train=True, targets=targets, loss_fn=loss_fn,
                           scales=[x / b for x in sizes], out_unflatten=lambda flat: _unflatten(self._cap.out_spec, flat))
        params = list(self.parameters())
        before = [q.grad for q in params]
        for q in params:
            q.grad = None
        try:
            self._rt.run_program(self._train_prog[1], self._train_sched.programs, state, sizes)
            self._reduce_tied()
            loss = self._broadcast_loss(state)
        except BaseException:
            for q, g in zip(params, before):
                q.grad = g
            raise
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
                ranks = sorted(self._users[id(ps[0])])
                self._collective(lambda: dist.all_reduce(flat, group=group),
                                 f"summing the gradients of parameters shared by ranks {ranks}")
                off = 0
                for q in ps:
                    q.grad = flat[off:off + q.numel()].view_as(q).clone()
                    off += q.numel()

    def _broadcast_loss(self, state: _StepState) -> torch.Tensor:
        last = self._last_rank()
        codes = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
        buf = torch.zeros(2, dtype=torch.float64)
        if self.rank == last:
            loss = sum(l.detach() for l in state.losses.values())
            buf[0] = loss.double().cpu()
            buf[1] = codes.index(loss.dtype) if loss.dtype in codes else 1
        self._collective(lambda: dist.broadcast(buf, src=last, group=self._ctrl),
                         f"receiving the loss from rank {last}")
        if self.rank == last:
            return loss
        return buf[0].to(codes[int(buf[1].item())]).to(self.device)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Pipelined inference on every rank: equals `model(*args, **kwargs)` on every rank."""
        from fxpipe.api import _concat, _unflatten

        per_mb, sizes, _ = self._split(args, kwargs)
        state = _StepState(inputs=per_mb, train=False)
        with torch.no_grad():
            self._rt.run_program(self._infer_prog[1], self._infer_sched.programs, state, sizes)
        last = self._last_rank()
        results = []
        for mb, n in enumerate(sizes):
            lay = self._layout("out", 0, n)
            if self.rank == last:
                buf = lay.pack(state.results[mb], self.device).clone()
            else:
                buf = lay.empty(self.device)
            if buf.numel():
                self._collective(lambda: dist.broadcast(buf, src=last), f"receiving the outputs from rank {last}")
            results.append(state.results[mb] if self.rank == last else lay.unpack(buf))
        flat = [_concat([results[mb][k] for mb in range(len(sizes))], sizes) for k in range(len(results[0]))]
        return _unflatten(self._cap.out_spec, flat)

    # ---- the nn.Module-like surface ----------------------------------------------------
    def _mine(self, t: torch.Tensor) -> bool:
        return self.rank in self._users.get(id(t), ())

    def parameters(self) -> Iterator[nn.Parameter]:
        """This rank's stages' parameters (each once, in the model's order)."""
        return (q for q in self.model.parameters() if self._mine(q))

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        return ((k, q) for k, q in self.model.named_parameters() if self._mine(q))

    def zero_grad(self, set_to_none: bool = True) -> None:
        for q in self.parameters():
            if set_to_none:
                q.grad = None
            elif q.grad is not None:
                q.grad.zero_()

    def _owner(self, t: torch.Tensor) -> int:
        rs = self._users.get(id(t))
        return min(rs) if rs else 0

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The original model's state dict on rank 0 (each tensor from its owner rank); {} elsewhere.

        Every rank must call it (it is a collective)."""
        objs = dict(self.model.named_parameters(remove_duplicate=False))
        objs.update(dict(self.model.named_buffers(remove_duplicate=False)))
        sd = self.model.state_dict()
        keys = [k for k in sd if k in objs]
        per_rank: dict[int, list[str]] = {}
        seen: set[int] = set()
        for k in keys:
            t = objs[k]
            if id(t) in seen:
                continue
            seen.add(id(t))
            per_rank.setdefault(self._owner(t), []).append(k)
        gathered: dict[str, torch.Tensor] = {}
        for r in range(1, self.world):
            ks = per_rank.get(r, [])
            if not ks:
                continue
            lay = BoundaryLayout([objs[k].detach() for k in ks], f"state of rank {r}")
            if self.rank == r:
                buf = lay.pack([objs[k].detach() for k in ks], self.device).clone()
                self._collective(lambda: dist.send(buf, dst=0), "sending its state to rank 0")
            elif self.rank == 0:
                buf = lay.empty(self.device)
                self._collective(lambda: dist.recv(buf, src=r), f"receiving the state of rank {r}")
                for k, v in zip(ks, lay.unpack(buf)):
                    gathered[k] = v.clone()
        if self.rank != 0:
            return {}
        by_id = {id(objs[k]): v for k, v in gathered.items()}
        return {k: by_id.get(id(objs[k]), v) if k in objs else v for k, v in sd.items()}

    def load_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> Any:
        """Load the full state dict on every rank (each keeps what its stages use)."""
        return self.model.load_state_dict(sd, strict=strict)

    def code(self, train: bool = True) -> str:
        """The generated program this rank runs."""
        return (self._train_prog if train else self._infer_prog)[0]

    def __repr__(self) -> str:
        return (f"DistributedCompiledModel({type(self.model).__name__}, rank {self.rank}/{self.world}, "
                f"stages {self.local_stages} of {self.plan.num_stages})")
