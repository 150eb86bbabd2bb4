"""The distributed runtime: one rank per device on torch.distributed (gloo on CPU, NCCL on GPUs).

Every rank runs its own device's generated program (runtime/program.py) against a
`DistRuntime`, which has the instruction set of `LocalRuntime` (forward, backward,
backward_input, backward_weight are LocalRuntime's own) but moves boundary values with
point-to-point `isend`/`irecv`:

* **No shape handshake.** A message's layout (`BoundaryLayout`) comes from the static
  shapes of the boundary values (`node.meta["fxpipe.val"]`) at the microbatch's size, so the
  receiver allocates its buffer before anything arrives.
* **One message per boundary.** Every value crossing a cut (tensors of any dtype, Python
  ints/floats from symbolic sizes) is packed into one flat byte buffer, each tensor at a
  16-byte aligned offset; bytes are copied, never cast, so the transfer is exact. A
  boundary of one tensor is sent from the tensor's own memory (no packing copy), and the
  receiver's tensors are views into the received buffer.
* **Receives posted early.** Every rank knows every program, so for each peer it knows the
  order in which that peer sends to it; receives are posted in that order, up to
  `prefetch` messages ahead of the one the program waits on (matching is by order for
  NCCL and by tag for gloo; both agree). NCCL runs with `prefetch=0` (an early receive
  on the pair's stream would block the sends behind it).
* **Timeouts.** Every wait has the runtime's timeout; a peer that died or hangs turns into
  a `PipelineFailure` naming this rank, the instruction and the peer rank.
* Stages on the same rank hand over through a local dict (interleaved schedules on one rank).
* **CPU memory churn.** `keep_freed_memory()` (opt-in, process-wide) stops glibc from giving
  large freed blocks back to the kernel, so the per-microbatch weight-gradient buffers are
  reused instead of page-faulted and zeroed again every microbatch
  (benchmarks/vs_torch_pipelining.py measures the difference).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import datetime
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from fxpipe.cuda.pack import pack_into
from fxpipe.errors import FxpipeError, RuntimeMismatchError
from fxpipe.runtime.local import LocalRuntime, StageRunner, _StepState

__all__ = ["BoundaryLayout", "DistRuntime", "PipelineFailure", "grad_layout", "keep_freed_memory", "message_order"]

_ALIGN = 16

# glibc mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_MMAP_THRESHOLD_MAX = 32 << 20  # glibc refuses more on 64-bit (half its heap size)


def keep_freed_memory(trim_threshold: int = 1 << 30) -> bool:
    """Make glibc's malloc keep freed blocks up to 32 MiB in the process (process-wide).

    Why: a CPU training step allocates and frees the same large tensors every microbatch
    (a Linear(1024, 4096) weight gradient is 16 MiB per microbatch before it is added into
    `.grad`). By default glibc serves such blocks with mmap or trims them off the heap when
    freed, so every microbatch page-faults and the kernel zeroes the pages again: tens of
    thousands of faults per step, ~10-20% of a 1-thread rank's CPU time. Fixing both
    thresholds keeps those blocks on the heap for reuse. Returns False (and changes nothing)
    where the C library is not glibc. Call it once per process, before the first step.
    """
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None) if libc is not None else None
        gnu = getattr(libc, "gnu_get_libc_version", None) if libc is not None else None
    except OSError:
        return False
    if mallopt is None or gnu is None:  # not glibc (musl, macOS): nothing to tune
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD_MAX)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


class PipelineFailure(RuntimeMismatchError):
    """A rank could not finish its program: a peer died, hung, or sent something else."""


@dataclass
class _Slot:
    kind: str  # "tensor", "int", "float", "const"
    dtype: torch.dtype | None = None
    shape: tuple[int, ...] = ()
    offset: int = 0
    nbytes: int = 0
    value: Any = None  # for "const"


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


class BoundaryLayout:
    """Where each value of one message lives in its flat byte buffer.

    Built from meta values (tensors, Python scalars, tuples/lists of them); anything else
    (None, dtypes, strings) is static and travels in the layout, not on the wire.
    """

    def __init__(self, values: Sequence[Any], what: str):
        self.what = what
        self.slots: list[_Slot] = []
        self.specs: list[Any] = []  # per value: how to rebuild it from the slots
        off = 0
        for v in values:
            spec, off = self._add(v, off)
            self.specs.append(spec)
        self.nbytes = off
        self.refs: list[Any] = list(values)
        tensors = [s for s in self.slots if s.kind == "tensor"]
        self.direct = len(tensors) == 1 and all(s.kind in ("tensor", "const") for s in self.slots)

    def _add(self, v: Any, off: int) -> tuple[Any, int]:
        if isinstance(v, torch.Tensor):
            nbytes = v.numel() * v.element_size()
            self.slots.append(_Slot("tensor", v.dtype, tuple(v.shape), off, nbytes))
            return len(self.slots) - 1, _align(off + nbytes)
        if isinstance(v, (bool, int, float)) or isinstance(v, torch.SymInt):
            kind = "float" if isinstance(v, float) else "int"
            self.slots.append(_Slot(kind, torch.float64 if kind == "float" else torch.int64, (), off, 8,
                                    value=type(v) if isinstance(v, (bool, int, float)) else int))
            return len(self.slots) - 1, _align(off + 8)
        if isinstance(v, (tuple, list)):
            parts = []
            for x in v:
                spec, off = self._add(x, off)
                parts.append(spec)
            return (type(v), parts), off
        self.slots.append(_Slot("const", value=v))
        return len(self.slots) - 1, off

    # ---- packing ------------------------------------------------------------------------
    def _leaves(self, values: Sequence[Any]) -> list[Any]:
        out: list[Any] = []

        def walk(spec: Any, v: Any) -> None:
            if isinstance(spec, tuple):
                for s, x in zip(spec[1], v):
                    walk(s, x)
            else:
                out.append(v)

        for spec, v in zip(self.specs, values):
            walk(spec, v)
        return out

    def pack(self, values: Sequence[Any], device: torch.device) -> torch.Tensor:
        """One contiguous uint8 buffer holding `values` (the tensor itself when it is alone)."""
        leaves = self._leaves(values)
        if len(leaves) != len(self.slots):
            raise PipelineFailure(f"{self.what}: {len(leaves)} values to send where the plan has {len(self.slots)}")
        for slot, v in zip(self.slots, leaves):
            if slot.kind == "tensor" and (not isinstance(v, torch.Tensor) or v.dtype != slot.dtype
                                          or tuple(v.shape) != slot.shape):
                got = f"shape {tuple(v.shape)} {v.dtype}" if isinstance(v, torch.Tensor) else type(v).__name__
                raise PipelineFailure(
                    f"{self.what}: a value has {got} but the plan's static shapes say {slot.shape} {slot.dtype}; "
                    "the model's shapes depend on the data (the distributed runtime needs static shapes)")
        if self.direct:
            t = next(v for s, v in zip(self.slots, leaves) if s.kind == "tensor")
            return t.detach().contiguous().reshape(-1).view(torch.uint8)
        buf = torch.empty(self.nbytes, dtype=torch.uint8, device=device)
        parts, scalars = [], []
        for slot, v in zip(self.slots, leaves):
            if slot.kind == "tensor":
                if slot.nbytes:
                    parts.append((v.to(device), slot.offset))
            elif slot.kind in ("int", "float"):
                scalars.append((slot, v))
        pack_into(buf, parts)  # one kernel launch for all tensors on CUDA (cuda/pack.py)
        for slot, v in scalars:
            t = torch.tensor([v], dtype=slot.dtype).view(torch.uint8)
            buf[slot.offset:slot.offset + 8].copy_(t)
        return buf

    def empty(self, device: torch.device) -> torch.Tensor:
        return torch.empty(self.nbytes, dtype=torch.uint8, device=device)

    def unpack(self, buf: torch.Tensor) -> list[Any]:
        """The values, tensors as views into `buf` (no copy)."""
        leaves: list[Any] = []
        host = None
        for slot in self.slots:
            if slot.kind == "tensor":
                if slot.nbytes:
                    leaves.append(buf[slot.offset:slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape))
                else:
                    leaves.append(torch.empty(slot.shape, dtype=slot.dtype, device=buf.device))
            elif slot.kind in ("int", "float"):
                if host is None:
                    host = buf.cpu() if buf.device.type != "cpu" else buf
                x = host[slot.offset:slot.offset + 8].view(slot.dtype).item()
                leaves.append(slot.value(x))
            else:
                leaves.append(slot.value)
        it = iter(leaves)

        def build(spec: Any) -> Any:
            if isinstance(spec, tuple):
                typ, parts = spec
                vals = [build(p) for p in parts]
                return typ(vals)
            return next(it)

        return [build(s) for s in self.specs]


def grad_layout(values: Sequence[Any], what: str) -> BoundaryLayout:
    """The layout of the gradients of boundary `values`: one slot per floating tensor (the
    values the receiver made leaves that require grad); `refs` says which, in order."""
    refs = [v if isinstance(v, torch.Tensor) and _floating(v) else None for v in values]
    lay = BoundaryLayout([r for r in refs if r is not None], what)
    lay.refs = refs
    return lay


def _is_detach(node: Any) -> bool:
    t = node.target
    if node.op == "call_method":
        return t in ("detach", "detach_")
    if node.op == "call_function":
        return t in (torch.detach, torch.Tensor.detach) or getattr(t, "__name__", "") in (
            "detach.default", "detach_.default", "detach", "detach_")
    return False


def _floating(v: Any) -> bool:
    if isinstance(v, torch.Tensor):
        return v.is_floating_point() or v.is_complex()
    if isinstance(v, (tuple, list)):
        return any(_floating(x) for x in v)
    return v is None  # no recorded value: assume it may be differentiable


def requires_grad_flow(gm: Any, root: Any, inputs_require_grad: Sequence[bool], val_key: str) -> dict[str, bool]:
    """Node name -> whether its value requires grad when the graph runs with grad enabled.

    Why: a stage's received values travel detached and the receiver makes them leaves; one
    that the sender computed without grad (`x.detach().mean()` feeding an in-place buffer
    update) must stay so, or the buffer joins this microbatch's graph and a later
    microbatch's backward runs through it. The local runtime reads the sender's flag; here it
    is a property of the graph, the same on every rank: a value requires grad when it depends
    on a parameter that does or on an input that does, unless a `detach`, a grad-disabled
    region, or a non-floating dtype cuts it. Unknown ops propagate (True when in doubt: that
    is the old, safe-for-gradients behaviour); an in-place op taints the tensor it mutates.

    Args:
        gm: the captured fx GraphModule (node names as in the stage graphs' recv lists).
        root: the model (for get_attr / call_module targets).
        inputs_require_grad: per placeholder, in order, whether the caller's tensor requires grad.
        val_key: the node.meta key holding the node's meta value (dtype check).
    """
    from fxpipe.passes.split_stages import resolve_attr

    flags: dict[str, bool] = {}
    ins = iter(inputs_require_grad)
    grad_on = True
    for node in gm.graph.nodes:
        deps = [flags.get(a.name, True) for a in node.all_input_nodes]
        if node.op == "placeholder":
            f = bool(next(ins, True))
        elif node.op == "get_attr":
            try:
                obj = resolve_attr(root, gm, node.target)
            except Exception:
                obj = None
            f = isinstance(obj, torch.Tensor) and obj.requires_grad
        elif node.op == "call_module":
            try:
                mod = resolve_attr(root, gm, node.target)
                own = any(q.requires_grad for q in mod.parameters())
            except Exception:
                own = True
            f = grad_on and (own or any(deps))
        elif node.op == "call_function" and node.target is torch._C._set_grad_enabled:
            grad_on = bool(node.args[0]) if node.args else True
            f = False
        elif node.op in ("call_function", "call_method"):
            if _is_detach(node):
                f = False
            elif isinstance(node.target, torch._ops.HigherOrderOperator) and \
                    getattr(node.target, "__name__", "") == "wrap_with_set_grad_enabled" and node.args and \
                    node.args[0] is False:
                f = False
            else:
                f = grad_on and any(deps)
                name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
                name = name.split(".")[0]  # aten overloads: "add_.Tensor"
                if f and node.all_input_nodes and name.endswith("_") and not name.endswith("__"):
                    flags[node.all_input_nodes[0].name] = True  # an in-place op makes its target require grad
        else:  # output
            f = any(deps)
        if node.op != "output" and not _floating(node.meta.get(val_key)):
            f = False
        flags[node.name] = f
    return flags


def message_order(programs: Sequence[Sequence[Any]], rank: int) -> dict[int, list[tuple[str, int, int]]]:
    """For each peer, the keys of the messages it sends to `rank`, in the order it sends them.

    Keys are the receiver's: ("act", s, mb) is stage s's input from stage s-1, ("grad", s, mb)
    the gradient of stage s's outputs from stage s+1.
    """
    out: dict[int, list[tuple[str, int, int]]] = {}
    for src, prog in enumerate(programs):
        if src == rank:
            continue
        for ins in prog:
            if ins.peer != rank:
                continue
            if ins.op.name == "SEND_ACT":
                out.setdefault(src, []).append(("act", ins.stage + 1, ins.mb))
            elif ins.op.name == "SEND_GRAD":
                out.setdefault(src, []).append(("grad", ins.stage - 1, ins.mb))
    return out


@dataclass
class _Posted:
    work: Any
    buf: torch.Tensor
    layout: BoundaryLayout


@dataclass
class _Pending:
    queue: deque = field(default_factory=deque)  # keys not yet posted, in the sender's order
    posted: dict = field(default_factory=dict)  # key -> _Posted


class DistRuntime(LocalRuntime):
    """Runs one rank's program: LocalRuntime's compute, p2p messages between ranks.

    Args:
        stages: every stage's StageRunner on this rank, None for the stages of other ranks.
        rank: this rank (= the plan's device index).
        stage_rank: stage -> rank.
        layout: layout(kind, s, mb_size) -> BoundaryLayout of the message for ("act"|"grad", s).
        group: the process group for point-to-point messages.
        threads: intra-op threads of this rank.
        timeout: seconds any one wait may take.
        prefetch: receives posted ahead per peer (0: post when the program reaches them).
    """

    def __init__(self, stages: Sequence[StageRunner | None], rank: int, world: int, stage_rank: Sequence[int],
                 layout: Callable[[str, int, int], BoundaryLayout], device: torch.device, group: Any = None,
                 threads: int = 1, timeout: float = 300.0, prefetch: int = 4, seeded: bool = False):
        local = [st for st in stages if st is not None]
        super().__init__(local, [threads] * world, timeout=timeout)
        # the plan's random-drawing CPU stages span two or more devices: draw a base seed per
        # call (the caller decided it over every rank's stages and rewrote this rank's)
        self._seeded = seeded
        self.stages = list(stages)
        self.rank, self.world = rank, world
        self.stage_rank = list(stage_rank)
        self.layout = layout
        self.device = device
        self.group = group
        self.prefetch = prefetch
        self.num_stages = len(stages)
        self._order: dict[int, list] = {}
        self._pending: dict[int, _Pending] = {}
        self._local: dict[tuple, Any] = {}
        self._sends: list[tuple[Any, torch.Tensor, str, int]] = []
        self._sizes: list[int] = []
        self.current = ["idle"] * world
        # stage -> per received value, whether it requires grad (requires_grad_flow); set by
        # the caller for each training step; None: every floating value does
        self.needs_grad: Callable[[int], list[bool]] | None = None

    # ---- driver ------------------------------------------------------------------------
    def run_program(self, program: Callable, programs: Sequence[Sequence[Any]], state: _StepState,
                    sizes: Sequence[int]) -> _StepState:
        """Run this rank's program for one step; raises PipelineFailure naming what it waited on."""
        self.state = state
        # as LocalRuntime.run: one base seed per call from the caller's generator (every rank
        # draws it, so the caller's generator advances as with the local backend)
        if self._seeded and len(state.inputs) > 1:
            state.rng_base = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self._sizes = list(sizes)
        self._local.clear()
        self._sends.clear()
        self._m = len(sizes)
        self._pending = {src: _Pending(deque(keys)) for src, keys in message_order(programs, self.rank).items()}
        prev = torch.get_num_threads()
        torch.set_num_threads(max(1, self.threads[self.rank]))
        try:
            for src in self._pending:
                self._post(src, self.prefetch)
            program(self)
            self._finish_sends()
            for streamer in self.streamers.values():  # offloaded stages' host gradients are final
                streamer.finish_step()
            left = {src: list(p.queue) + list(p.posted) for src, p in self._pending.items() if p.queue or p.posted}
            if left:
                raise PipelineFailure(f"rank {self.rank}: the step ended with messages never received: {left}")
        except FxpipeError:
            raise
        except Exception as e:
            raise PipelineFailure(f"rank {self.rank} failed while running {self.current[self.rank]}: "
                                  f"{type(e).__name__}: {e}") from e
        finally:
            torch.set_num_threads(prev)
            self._pending = {}
            self._local.clear()
        self.state = None
        return state

    # ---- messages ----------------------------------------------------------------------
    def _tag(self, key: tuple[str, int, int]) -> int:
        kind, s, mb = key
        return ((0 if kind == "act" else 1) * self.num_stages + s) * self._m + mb

    def _layout_of(self, key: tuple[str, int, int]) -> BoundaryLayout:
        kind, s, mb = key
        return self.layout(kind, s, self._sizes[mb])

    def _post(self, src: int, n: int) -> None:
        p = self._pending[src]
        while p.queue and len(p.posted) < n:
            key = p.queue.popleft()
            lay = self._layout_of(key)
            buf = lay.empty(self.device)
            work = dist.irecv(buf, src=src, group=self.group, tag=self._tag(key)) if buf.numel() else None
            p.posted[key] = _Posted(work, buf, lay)

    def _wait(self, work: Any, what: str, peer: int, action: str) -> None:
        if work is None:
            return
        try:
            work.wait(datetime.timedelta(seconds=self.timeout))
        except Exception as e:  # gloo: timeout or closed connection; NCCL: watchdog/abort
            msg = str(e)
            if "imed out" in msg or "imeout" in msg:
                done = "nothing arrived" if action == "waiting for" else "it did not take the message"
                why = (f"waited {self.timeout:g}s and {done}: rank {peer} is stuck, slower than the "
                       "timeout, died, or is not in this call (every rank must call step / cm(...) together; "
                       "raise timeout= for very slow stages)")
            else:
                why = f"rank {peer} is gone ({msg.splitlines()[0][:200]}): it probably crashed; see its log"
            raise PipelineFailure(f"rank {self.rank} failed on {what} ({action} rank {peer}): {why}") from None

    def _receive(self, src: int, key: tuple[str, int, int], what: str) -> list[Any]:
        self.current[self.rank] = what
        if src == self.rank:
            if key not in self._local:
                raise PipelineFailure(f"rank {self.rank}: {what} from its own stage, which has not sent it")
            return self._local.pop(key)
        p = self._pending.get(src)
        if p is None or (key not in p.posted and key not in p.queue):
            raise PipelineFailure(f"rank {self.rank}: {what} expects a message rank {src} never sends "
                                  "(the programs disagree: was every rank given the same plan?)")
        while key not in p.posted:  # post in the sender's order up to this one
            self._post(src, len(p.posted) + 1)
        posted = p.posted.pop(key)
        self._post(src, max(self.prefetch, 0))  # keep the window full
        self._wait(posted.work, what, src, "waiting for")
        return posted.layout.unpack(posted.buf)

    def _send(self, dst: int, key: tuple[str, int, int], values: list[Any], what: str) -> None:
        self.current[self.rank] = what
        if dst == self.rank:
            self._local[key] = values
            return
        buf = self._layout_of(key).pack(values, self.device)
        work = dist.isend(buf, dst=dst, group=self.group, tag=self._tag(key)) if buf.numel() else None
        self._sends.append((work, buf, what, dst))
        # free the buffers of finished sends
        if len(self._sends) > 8:
            self._sends = [x for x in self._sends if x[0] is not None and not x[0].is_completed()]

    def _finish_sends(self) -> None:
        for work, _, what, dst in self._sends:
            self._wait(work, what, dst, "sending to")
        self._sends.clear()

    # ---- instruction set (p2p half; compute is LocalRuntime's) -------------------------
    def send_act(self, s: int, mb: int, dst: int) -> None:
        state = self.state
        what = f"SEND_ACT(s{s},mb{mb}->d{dst})"
        _, out, _ = state.stash[(s, mb)]
        if not state.train:
            state.stash.pop((s, mb))
        if state.train and self.needs_grad is not None:
            # the receiver trusts the graph's flags; a value that requires grad where the graph
            # says it cannot would lose its gradient silently, so it stops the step here
            lost = [i for i, (o, f) in enumerate(zip(out, self.needs_grad(s + 1)))
                    if isinstance(o, torch.Tensor) and o.requires_grad and not f]
            if lost:
                raise PipelineFailure(
                    f"rank {self.rank}: {what}: boundary value(s) {lost} require grad but the graph analysis "
                    "(runtime/distributed.py requires_grad_flow) says they cannot; their gradients would be lost. "
                    "This is an fxpipe bug: please report it with the model")
        payload = [o.detach() if isinstance(o, torch.Tensor) else o for o in out]
        self._send(dst, ("act", s + 1, mb), payload, what)

    def recv_act(self, s: int, mb: int, src: int) -> None:
        payload = self._receive(src, ("act", s, mb), f"RECV_ACT(s{s},mb{mb}<-d{src})")
        self.state.stash[(s, mb)] = (payload, None, None)
        if self.state.train and self.needs_grad is not None:  # read by LocalRuntime.forward
            self.state.needs_grad[(s, mb)] = self.needs_grad(s)

    def send_grad(self, s: int, mb: int, dst: int) -> None:
        what = f"SEND_GRAD(s{s},mb{mb}->d{dst})"
        grads = self.state.grads_out.pop((s, mb))
        if dst == self.rank:
            self._send(dst, ("grad", s - 1, mb), grads, what)
            return
        lay = self._layout_of(("grad", s - 1, mb))
        # only floating boundary values have gradient slots; a missing gradient is a zero one
        vals = []
        for g, ref in zip(grads, lay.refs):
            if ref is None:
                continue
            vals.append(g if g is not None else torch.zeros(ref.shape, dtype=ref.dtype, device=self.device))
        self._send(dst, ("grad", s - 1, mb), vals, what)

    def recv_grad(self, s: int, mb: int, src: int) -> None:
        what = f"RECV_GRAD(s{s},mb{mb}<-d{src})"
        if src == self.rank:
            grads = self._receive(src, ("grad", s, mb), what)
        else:
            lay = self._layout_of(("grad", s, mb))
            vals = iter(self._receive(src, ("grad", s, mb), what))
            grads = [next(vals) if ref is not None else None for ref in lay.refs]
        self.state.stash[("grad", s, mb)] = grads
