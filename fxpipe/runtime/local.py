"""The local runtime: one process, one worker thread per device, mailboxes between them.

Each worker runs its device's generated program (runtime/program.py). Torch ops release
the GIL, so several "cpu" workers really compute in parallel; each worker sets its own
intra-op thread count (OpenMP's is per thread) so they do not oversubscribe the cores. CUDA
workers compute on their own stream; a send records an event that the receiver's stream
waits on before copying, so no host synchronisation sits on the hot path.

A failure in any worker aborts the others at their next blocking receive; a receive that
waits longer than `timeout` fails naming the device and the instruction it waited on.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
import torch.utils.checkpoint
import torch.utils._pytree as pytree

from fxpipe.errors import FxpipeError, PlanError, RuntimeMismatchError
from fxpipe.runtime.offload import WeightStreamer
from fxpipe.runtime.seeded_rng import generator_scope, microbatch_seed, seed_random_ops
from fxpipe.runtime.unit_recompute import UnitCheckpoints, buffers_updated_once
from fxpipe.runtime.transfer import Channel
from fxpipe.runtime.weight_grad import Consumers, SplitState, backward_input, backward_weight, trainable_consumers

__all__ = ["StageRunner", "LocalRuntime", "PipelineAborted", "measured_timeline"]


class PipelineAborted(FxpipeError):
    """Raised in a worker when another worker failed first."""


@dataclass
class StageRunner:
    """What the runtime needs to execute one stage."""

    index: int
    module: fx.GraphModule
    device: torch.device
    device_index: int
    n_recv: int
    input_positions: tuple[int, ...]  # which flat model inputs the stage reads
    is_last: bool
    # For split backward (BI/BW): the module returns n_out outputs, then consumer outputs.
    n_out: int | None = None
    consumers: Consumers | None = None
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    # activation recomputation (the plan's StagePlan.recompute): the training forward runs
    # under torch.utils.checkpoint, so only the stage's inputs are kept and the forward runs
    # again inside its backward
    recompute: bool = False
    # offload streaming (the plan's StagePlan.offload): the parameters stay on the host and
    # visit the device one unit at a time (runtime/offload.py)
    offload: bool = False

    @property
    def uses_rng(self) -> bool:
        """Whether the stage's forward draws random numbers (dropout and the like)."""
        cached = self.__dict__.get("_uses_rng")
        if cached is None:
            cached = self.__dict__["_uses_rng"] = _draws_random(self.module)
        return cached


def _streamer_for(st: StageRunner) -> WeightStreamer:
    """The weight streamer of an offloaded stage; the combination it cannot run is refused. With
    recompute, each streamed unit is checkpointed on its own (`_unit_checkpoints`)."""
    if st.n_out is not None:
        raise PlanError(f"stage {st.index} is offloaded, but the schedule splits its backward (BI/BW, zero-bubble), "
                        "which offload streaming does not support; use schedule='1f1b' or 'gpipe', or offload='off'")
    return WeightStreamer(st.module, st.device, recompute=st.recompute)


_RANDOM_NAMES = ("dropout", "rand", "bernoulli", "multinomial", "normal", "uniform", "exponential", "cauchy",
                 "geometric", "log_normal", "poisson")


def _draws_random(module: torch.nn.Module) -> bool:
    """Conservatively: any call whose target names a random op, or a called submodule that
    is or contains a dropout module (a false positive only costs some serialisation)."""
    graph = getattr(module, "graph", None)
    if graph is None:
        return True
    for n in graph.nodes:
        if n.op == "call_module":
            sub = module.get_submodule(n.target)
            if any(isinstance(x, torch.nn.modules.dropout._DropoutNd) or "dropout" in type(x).__name__.lower()
                   for x in sub.modules()):
                return True
        elif n.op in ("call_function", "call_method"):
            name = n.target if isinstance(n.target, str) else getattr(n.target, "__name__", str(n.target))
            if any(r in str(name).lower() for r in _RANDOM_NAMES):
                return True
    return False


class _Mailbox:
    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.items: dict[tuple, Any] = {}

    def put(self, key: tuple, value: Any) -> None:
        with self.cv:
            self.items[key] = value
            self.cv.notify_all()

    def get(self, key: tuple, deadline: float, aborted: threading.Event) -> Any:
        with self.cv:
            while key not in self.items:
                if aborted.is_set():
                    raise PipelineAborted("another worker failed")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                self.cv.wait(min(left, 0.2))
            return self.items.pop(key)


@dataclass
class _StepState:
    inputs: list[list[torch.Tensor]]  # per microbatch, the flat model inputs
    train: bool
    targets: list[Any] | None = None
    loss_fn: Callable | None = None
    scales: list[float] | None = None
    out_unflatten: Callable[[list], Any] | None = None
    stash: dict[tuple, Any] = field(default_factory=dict)  # (stage, mb) -> (leaves, outputs, consumer outputs)
    results: dict[int, list] = field(default_factory=dict)  # mb -> last stage's flat outputs
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    grads_out: dict[tuple[int, int], list] = field(default_factory=dict)
    events: list = field(default_factory=list)  # measured Events when recording
    saved_bytes: dict[tuple[int, int], float] = field(default_factory=dict)  # (stage, mb) -> bytes, when recording
    # (receiving stage, mb) -> per received value, whether the sender's value required grad
    # (the payload itself travels detached); absent: every floating value is differentiable
    needs_grad: dict[tuple[int, int], list[bool]] = field(default_factory=dict)
    # the caller's torch.autocast state, (device type, dtype, cache) per enabled type: autocast
    # is thread-local, so the worker threads re-enter it around each forward (`run` sets it)
    autocast: tuple[tuple[str, torch.dtype, bool], ...] = ()
    # base seed of the (stage, mb) generators of random-drawing CPU stages (runtime/seeded_rng.py),
    # drawn from the caller's generator per call; None: they draw from torch's default generator
    rng_base: int | None = None


def _caller_autocast() -> tuple[tuple[str, torch.dtype, bool], ...]:
    """The calling thread's enabled torch.autocast contexts (device type, dtype, cache)."""
    types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return tuple((t, torch.get_autocast_dtype(t), torch.is_autocast_cache_enabled())
                 for t in types if torch.is_autocast_enabled(t))


def _autocast_scope(states: Sequence[tuple[str, torch.dtype, bool]]) -> contextlib.ExitStack:
    """Enter the given autocast contexts (see `_caller_autocast`) in this thread."""
    stack = contextlib.ExitStack()
    for device_type, dtype, cache in states:
        stack.enter_context(torch.autocast(device_type, dtype=dtype, cache_enabled=cache))
    return stack


class LocalRuntime:
    """Executes per-device programs over stage runners in worker threads.

    The methods below (forward, backward, send_*, recv_*) are the instruction set the
    generated programs call.
    """

    def __init__(self, stages: Sequence[StageRunner], threads: Sequence[int], timeout: float = 300.0):
        self.stages = list(stages)
        self.threads = list(threads)
        self.timeout = timeout
        self.mailboxes = [_Mailbox() for _ in threads]
        self.aborted = threading.Event()
        self.current: list[str] = ["idle"] * len(threads)
        self.state: _StepState | None = None
        self.streams: dict[int, Any] = {}
        # The CPU generator is one per process, shared by every CPU worker thread: a stage that
        # recomputes dropout must draw the same numbers again in its backward, so while such a
        # stage exists, every random-drawing CPU forward and every such recomputation runs under
        # one lock (checkpoint restores the generator state it saved; nobody may draw between).
        self._rng_lock: threading.Lock | None = None
        if any(st.recompute and st.device.type == "cpu" and st.uses_rng for st in self.stages):
            self._rng_lock = threading.Lock()
        # Random-drawing stages on two or more CPU workers would draw from that one generator
        # concurrently, in an order set by thread timing: a seeded run would not repeat. Their
        # random ops draw from a generator per (stage, microbatch) instead (runtime/seeded_rng.py).
        # Before the streamers below, which copy the stage graphs.
        self._seeded = False
        if len({st.device_index for st in self.stages if st.device.type == "cpu" and st.uses_rng}) > 1:
            for st in self.stages:
                if st.device.type == "cpu" and st.uses_rng and seed_random_ops(st.module):
                    self._seeded = True
        for st in self.stages:
            if st.device.type == "cuda" and st.device_index not in self.streams:
                self.streams[st.device_index] = torch.cuda.Stream(device=st.device)
        # Boundaries cross devices on a copy stream per channel, started at the send
        # (runtime/transfer.py; overlap efficiency 0.87 on an H100, benchmarks/overlap.py).
        # FXPIPE_COPY_STREAMS=0 makes the receiver copy on its compute stream instead.
        self.copy_streams = os.environ.get("FXPIPE_COPY_STREAMS", "1") != "0"
        self.worker_device = {st.device_index: st.device for st in self.stages}
        self.channels: dict[tuple[int, int], Channel] = {}
        # offloaded stages: their weights stream from host memory (runtime/offload.py)
        self.streamers: dict[int, WeightStreamer] = {}
        self._unit_checkpoints: dict[int, UnitCheckpoints] = {}  # offloaded stages that also recompute
        for st in self.stages:
            if getattr(st, "offload", False):
                self.streamers[st.index] = _streamer_for(st)
                if st.recompute:
                    self._unit_checkpoints[st.index] = UnitCheckpoints(self.streamers[st.index].module)

    # ---- driver ------------------------------------------------------------------------
    def run(self, programs: Sequence[Callable], state: _StepState, record: bool = False) -> _StepState:
        """Run one step: every device's program in its own thread; re-raise the first error.

        With `record`, every instruction's start and end (seconds from the step's start) are
        collected in `state.events` as simulator Events, so a measured step draws like a
        predicted one. On CUDA the stream is synchronised after each instruction while
        recording, so the times are the device's, not the host's launch times.
        """
        self.state = state
        state.autocast = _caller_autocast()
        # One microbatch runs the stages one after another, drawing in eager's order (equal to
        # eager); with more, draw the call's base seed here, in the caller's thread, so that
        # torch.manual_seed before the call decides every mask
        if self._seeded and len(state.inputs) > 1:
            state.rng_base = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        t0 = time.perf_counter()
        self.aborted.clear()
        for mb in self.mailboxes:
            mb.items.clear()
        errors: list[tuple[int, BaseException]] = []
        lock = threading.Lock()

        def work(d: int, prog: Callable) -> None:
            torch.set_num_threads(max(1, self.threads[d]))
            try:
                stream = self.streams.get(d)
                rt = _Recorder(self, d, t0, state.events, stream) if record else self
                if stream is not None:
                    torch.cuda.set_device(stream.device)  # a fresh thread has no CUDA context
                    with torch.cuda.stream(stream):
                        prog(rt)
                else:
                    prog(rt)
            except BaseException as e:  # reported by the driver below
                with lock:
                    errors.append((d, e))
                self._abort()

        prev_threads = torch.get_num_threads()
        workers = [threading.Thread(target=work, args=(d, p), name=f"fxpipe-device-{d}", daemon=True)
                   for d, p in enumerate(programs)]
        ok = False
        attempted: list[threading.Thread] = []
        try:
            try:
                # starting is inside: a Ctrl-C raised while or right after the last worker
                # starts (a fast last stage) must stop the workers already running too
                for w in workers:
                    attempted.append(w)
                    w.start()
                for w in workers:
                    w.join()
            except BaseException:
                # Ctrl-C in the driver: stop the workers at their next receive, then re-raise
                self._abort()
                for w in attempted:
                    _join_once_started(w)
                raise
            for s in self.streams.values():
                s.synchronize()
            real = [(d, e) for d, e in errors if not isinstance(e, PipelineAborted)]
            if real:
                d, e = real[0]
                if isinstance(e, FxpipeError) or not isinstance(e, Exception):
                    raise e  # KeyboardInterrupt / SystemExit from a worker stay what they are, as in eager
                raise RuntimeMismatchError(
                    f"device {d} failed while running {self.current[d]}: {type(e).__name__}: {e}") from e
            ok = True
            return state
        finally:
            torch.set_num_threads(prev_threads)
            self.state = None
            for streamer in self.streamers.values():  # host gradients final before step returns
                streamer.finish_step()
            if not ok:  # a failed step's activations, graphs and undelivered messages go now
                for box in self.mailboxes:
                    with box.cv:
                        box.items.clear()

    def _abort(self) -> None:
        self.aborted.set()
        for m in self.mailboxes:
            with m.cv:
                m.cv.notify_all()

    # ---- instruction set ---------------------------------------------------------------
    def _to(self, value: Any, device: torch.device) -> Any:
        def move(t: Any) -> Any:
            if isinstance(t, torch.Tensor) and t.device != device:
                return t.to(device, non_blocking=device.type == "cuda")
            return t

        return pytree.tree_map(move, value)

    def forward(self, s: int, mb: int) -> None:
        """F: the stage's forward for one microbatch (and the loss on the last stage), under
        the caller's torch.autocast as eager would run it. Backward runs outside autocast,
        as after `with torch.autocast(...): loss = ...` in eager."""
        with _autocast_scope(self.state.autocast):
            self._forward(s, mb)

    def _forward(self, s: int, mb: int) -> None:
        st, state = self.stages[s], self.state
        self.current[st.device_index] = f"F(s{s},mb{mb})"
        recv = state.stash.pop((s, mb), ([], None))[0] if s > 0 else []
        # A value the sender computed without grad (x.detach().mean() feeding an in-place buffer
        # update) must stay so here: made a leaf that requires grad, it would pull the buffer
        # into this microbatch's graph and the next microbatch's backward would run through it
        needs = state.needs_grad.pop((s, mb), None)
        leaves = []
        for i, v in enumerate(recv):
            # complex too: a rotary product (view_as_complex) cut between stages carries gradient
            if state.train and isinstance(v, torch.Tensor) and (v.is_floating_point() or v.is_complex()):
                v = v.detach().requires_grad_(needs is None or needs[i])
            leaves.append(v)
        model_in = [self._to(state.inputs[mb][i], st.device) for i in st.input_positions]
        streamer = self.streamers.get(s)
        with torch.set_grad_enabled(state.train), self._rng_guard(st), self._generator(st, mb):
            if streamer is not None:
                with streamer.forward_scope(state.train) as module:
                    if state.train and st.recompute:  # a checkpoint per streamed unit (runtime/unit_recompute.py)
                        out = list(self._unit_checkpoints[s]([*leaves, *model_in], preserve_rng_state=st.uses_rng))
                    else:
                        out = list(module(*leaves, *model_in))
            elif state.train and st.recompute:
                # keeps only the inputs; the forward is re-run (same RNG state) during backward.
                # Saving and restoring the RNG state only where the stage draws random numbers:
                # the restore rewinds the process-wide CPU generator, which must not happen
                # outside the RNG lock while another worker draws from it
                out = list(torch.utils.checkpoint.checkpoint(buffers_updated_once(st.module), *leaves, *model_in,
                                                             use_reentrant=False,
                                                             preserve_rng_state=st.uses_rng))
            else:
                out = list(st.module(*leaves, *model_in))
        consumer_out: list = []
        if st.n_out is not None:
            out, consumer_out = out[: st.n_out], out[st.n_out:]
        if st.is_last:
            if state.train:
                structured = state.out_unflatten(out)
                loss = state.loss_fn(structured, self._to(state.targets[mb], st.device))
                if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                    shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
                    raise RuntimeMismatchError(
                        f"loss_fn must return a scalar tensor, got {shape}; reduce it (e.g. .mean()) inside loss_fn")
                loss = loss.reshape(()) * state.scales[mb]
                # detached: a graph-connected loss here would keep the microbatch's saved
                # activations alive until the step ends (the split backward retains its graph)
                state.losses[mb] = loss.detach()
                state.stash[(s, mb)] = (leaves, [loss], consumer_out)
            else:
                state.results[mb] = [o.detach() if isinstance(o, torch.Tensor) else o for o in out]
        else:
            state.stash[(s, mb)] = (leaves, out, consumer_out) if state.train else (None, out, None)

    def backward(self, s: int, mb: int) -> None:
        st, state = self.stages[s], self.state
        self.current[st.device_index] = f"B(s{s},mb{mb})"
        leaves, outs, _ = state.stash.pop((s, mb))
        if st.is_last:
            tensors, grads = outs, [None]
        else:
            g = state.stash.pop(("grad", s, mb))
            pairs = [(o, gi) for o, gi in zip(outs, g) if isinstance(o, torch.Tensor) and o.requires_grad and gi is not None]
            tensors, grads = [p[0] for p in pairs], [p[1] for p in pairs]
        if tensors:
            streamer = self.streamers.get(s)
            scope = streamer.backward_scope() if streamer is not None else contextlib.nullcontext()
            with self._rng_guard(st, recomputing=True), scope, self._generator(st, mb, recomputing=True):
                torch.autograd.backward(tensors, grads)
        state.grads_out[(s, mb)] = [(v.grad if isinstance(v, torch.Tensor) and v.requires_grad else None) for v in leaves]

    def backward_input(self, s: int, mb: int) -> None:
        """BI: gradients w.r.t. the stage inputs only; what BW needs is kept."""
        st, state = self.stages[s], self.state
        self.current[st.device_index] = f"BI(s{s},mb{mb})"
        leaves, outs, consumer_out = state.stash.pop((s, mb))
        grads = [None] if st.is_last else state.stash.pop(("grad", s, mb))
        split = SplitState(list(outs), list(grads), list(consumer_out or []),
                           keep=trainable_consumers(st.consumers, st.params) if st.consumers else None)
        state.grads_out[(s, mb)] = backward_input(split, leaves)
        state.stash[("W", s, mb)] = split

    def backward_weight(self, s: int, mb: int) -> None:
        """BW: the stage's parameter gradients from what BI kept."""
        st, state = self.stages[s], self.state
        self.current[st.device_index] = f"BW(s{s},mb{mb})"
        split = state.stash.pop(("W", s, mb))
        backward_weight(split, st.consumers or Consumers((), frozenset()), st.params)

    def send_act(self, s: int, mb: int, dst: int) -> None:
        st, state = self.stages[s], self.state
        self.current[st.device_index] = f"SEND_ACT(s{s},mb{mb}->d{dst})"
        _, out, _ = state.stash[(s, mb)]
        if not state.train:
            state.stash.pop((s, mb))
        payload = [o.detach() if isinstance(o, torch.Tensor) else o for o in out]
        if state.train:  # written before the put: the receiver reads it after its get
            state.needs_grad[(s + 1, mb)] = [isinstance(o, torch.Tensor) and o.requires_grad for o in out]
        self.mailboxes[dst].put(("act", s + 1, mb), self._ship(st, dst, payload))

    def recv_act(self, s: int, mb: int, src: int) -> None:
        st, state = self.stages[s], self.state
        payload = self._recv(st, ("act", s, mb), f"RECV_ACT(s{s},mb{mb}<-d{src})")
        state.stash[(s, mb)] = (self._to(payload, st.device), None, None)

    def send_grad(self, s: int, mb: int, dst: int) -> None:
        st, state = self.stages[s], self.state
        self.current[st.device_index] = f"SEND_GRAD(s{s},mb{mb}->d{dst})"
        grads = state.grads_out.pop((s, mb))
        self.mailboxes[dst].put(("grad", s - 1, mb), self._ship(st, dst, grads))

    def recv_grad(self, s: int, mb: int, src: int) -> None:
        st, state = self.stages[s], self.state
        grads = self._recv(st, ("grad", s, mb), f"RECV_GRAD(s{s},mb{mb}<-d{src})")
        state.stash[("grad", s, mb)] = self._to(grads, st.device)

    # ---- helpers -----------------------------------------------------------------------
    def _rng_guard(self, st: StageRunner, recomputing: bool = False) -> Any:
        """The RNG lock (see __init__) when `st` draws random numbers on the CPU, else nothing."""
        if self._rng_lock is None or st.device.type != "cpu" or not st.uses_rng or (recomputing and not st.recompute):
            return contextlib.nullcontext()
        return self._rng_lock

    def _generator(self, st: StageRunner, mb: int, recomputing: bool = False) -> Any:
        """The (stage, mb) generator scope of a seeded CPU stage's forward (again in its
        recomputation, so that it draws the same masks), else nothing."""
        base = self.state.rng_base
        if base is None or st.device.type != "cpu" or (recomputing and not st.recompute):
            return contextlib.nullcontext()
        return generator_scope(microbatch_seed(base, st.index, mb))

    def _ship(self, st: StageRunner, dst: int, payload: list) -> tuple[list, Any]:
        """(payload, event) for the mailbox: moved on the channel's copy stream when enabled
        and a device boundary with a GPU is crossed, else as produced with the sender's event."""
        dst_dev = self.worker_device.get(dst, st.device)
        if self.copy_streams and dst_dev != st.device and "cuda" in (dst_dev.type, st.device.type):
            ch = self.channels.get((st.device_index, dst))
            if ch is None:
                ch = self.channels[(st.device_index, dst)] = Channel(st.device, dst_dev)
            return ch.send(payload)
        return payload, self._event(st)

    def _event(self, st: StageRunner) -> Any:
        if st.device.type != "cuda":
            return None
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(st.device))
        return ev

    def _recv(self, st: StageRunner, key: tuple, what: str) -> Any:
        self.current[st.device_index] = what
        try:
            payload, event = self.mailboxes[st.device_index].get(key, time.monotonic() + self.timeout, self.aborted)
        except TimeoutError:
            raise RuntimeMismatchError(
                f"device {st.device_index} waited {self.timeout:.0f}s on {what} and nothing arrived; "
                "the peer is stuck or the schedule is broken (raise timeout= for very slow stages)") from None
        if event is not None and st.device.type == "cuda":
            stream = torch.cuda.current_stream(st.device)
            stream.wait_event(event)
            for t in pytree.tree_leaves(payload):  # arrived on a copy stream: used on this one now
                if isinstance(t, torch.Tensor) and t.device == st.device:
                    t.record_stream(stream)
        elif event is not None:
            event.synchronize()  # a CPU worker reads what a GPU stream wrote: wait for it
        return payload


_OPS = {"forward": "FWD", "backward": "BWD", "backward_input": "BWD_INPUT", "backward_weight": "BWD_WEIGHT",
        "send_act": "SEND_ACT", "recv_act": "RECV_ACT", "send_grad": "SEND_GRAD", "recv_grad": "RECV_GRAD"}


class _Recorder:
    """Stands in for the runtime in one device's program and times each instruction.

    It also measures the activation memory of each forward: the bytes of the tensors autograd
    saves for backward (`saved_tensors_hooks` around the stage's forward; each storage counted
    once, parameters and buffers excluded), into `state.saved_bytes[(stage, mb)]`.
    """

    def __init__(self, rt: LocalRuntime, device: int, t0: float, events: list, stream: Any):
        self._rt, self._d, self._t0, self._events, self._stream = rt, device, t0, events, stream
        self._params: dict[int, set[int]] = {}  # stage -> storage pointers of its parameters and buffers

    def _measured_forward(self, fn: Callable[..., None], s: int, mb: int) -> None:
        st = self._rt.stages[s]
        if s not in self._params:
            self._params[s] = {t.untyped_storage().data_ptr() for t in list(st.module.parameters()) + list(st.module.buffers())}
        params = self._params[s]
        # per storage, the distinct views saved of it: a view of a larger tensor (a microbatch
        # slice of the caller's batch) counts its own bytes, capped at the storage's size
        views: dict[int, tuple[int, set]] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                storage = t.untyped_storage()
                ptr = storage.data_ptr()
                if ptr not in params:
                    views.setdefault(ptr, (storage.nbytes(), set()))[1].add(
                        (t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.element_size()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(s, mb)
        total = sum(min(cap, sum(math.prod(shape) * size for _, shape, _, size in vs)) for cap, vs in views.values())
        self._rt.state.saved_bytes[(s, mb)] = float(total)

    def __getattr__(self, name: str) -> Callable:
        fn = getattr(self._rt, name)
        op_name = _OPS.get(name)
        if op_name is None:
            return fn

        def timed(s: int, mb: int, src: int = -1, dst: int = -1) -> None:
            from fxpipe.passes.emit_schedule import Instr, Op
            from fxpipe.passes.simulate_schedule import Event

            peer = src if src >= 0 else dst
            start = time.perf_counter()
            if op_name == "FWD" and self._rt.state.train:
                self._measured_forward(fn, s, mb)
            else:
                fn(s, mb, **({"src": src} if src >= 0 else {"dst": dst} if dst >= 0 else {}))
            if self._stream is not None:
                self._stream.synchronize()
            end = time.perf_counter()
            op = Op[op_name]
            lane = "comm" if op_name.startswith("SEND") else "compute"
            self._events.append(Event(self._d, Instr(op, s, mb, peer), start - self._t0, end - self._t0, lane))

        return timed


def measured_timeline(events: Sequence[Any], num_devices: int, peak_inflight: Sequence[int],
                      saved_bytes: dict[tuple[int, int], float] | None = None) -> Any:
    """A simulator Timeline from a recorded step (same event names, so traces overlay).

    With `saved_bytes` ((stage, mb) -> bytes its forward saved for backward), the timeline's
    `memory` / `peak_memory` are the measured activation memory per device, counted as the
    simulator counts it: allocated when the FWD starts, freed when its B (or BW) ends.
    """
    from fxpipe.passes.emit_schedule import Op
    from fxpipe.passes.simulate_schedule import Timeline

    events = sorted(events, key=lambda e: (e.start, e.device))
    step = max((e.end for e in events), default=0.0)
    busy = [0.0] * num_devices
    for e in events:
        if e.lane == "compute" and not e.instr.op.name.startswith("RECV"):
            busy[e.device] += e.end - e.start
    bubble = tuple(1 - b / step if step > 0 else 0.0 for b in busy)
    memory = peak = None
    if saved_bytes:
        changes: list[list[tuple[float, int, float]]] = [[] for _ in range(num_devices)]
        for e in events:
            key = (e.instr.stage, e.instr.mb)
            if e.instr.op is Op.FWD:
                changes[e.device].append((e.start, 1, saved_bytes.get(key, 0.0)))
            elif e.instr.op in (Op.BWD, Op.BWD_WEIGHT):
                changes[e.device].append((e.end, 0, -saved_bytes.get(key, 0.0)))  # frees first at a tie
        mem = []
        for ch in changes:
            ch.sort(key=lambda c: (c[0], c[1]))
            steps, level = [(0.0, 0.0)], 0.0
            for t, _, b in ch:
                level = max(0.0, level + b)
                if steps[-1][0] == t:
                    steps[-1] = (t, level)
                else:
                    steps.append((t, level))
            mem.append(tuple(steps))
        memory = tuple(mem)
        peak = tuple(max(b for _, b in steps) for steps in memory)
    return Timeline(tuple(events), step, tuple(busy), bubble, tuple(peak_inflight), memory, peak)


def _join_once_started(w: threading.Thread, patience: float = 2.0) -> None:
    """Join a worker whose start() was interrupted: the thread may already run (start() raised
    while waiting for it to come up), in which case join() refuses for a moment ("cannot join
    thread before it is started"); a start interrupted before the thread existed never runs."""
    deadline = time.monotonic() + patience
    while True:
        try:
            w.join()
            return
        except RuntimeError:
            if time.monotonic() > deadline:
                return
            time.sleep(0.001)
