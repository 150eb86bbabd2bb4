"""Offload streaming: a stage's weights live on the host and visit the device one unit at a time.

A stage whose plan says `offload` (StagePlan.offload) keeps its parameters, their gradients
and hence the optimizer state in host memory (pinned when CUDA is available, so copies are
asynchronous). Its device holds the weights of about two *units* at a time -- the one
computing and the one being prefetched -- plus activations, as in Superpipeline.

Mechanism (chosen over `torch.func.functional_call`, which wants every weight up front):

* **Units.** The stage's fx graph is copied; every `get_attr` of a parameter is re-read right
  before each node that uses it, so a read happens where the weight is needed. The nodes that
  read parameters (call_module nodes, users of parameter get_attrs) are grouped by owning
  module in graph order, and consecutive groups are merged until a unit holds at least
  `min_unit_bytes` (tiny LayerNorms ride with their neighbours). Before the first node of unit
  k the graph calls `enter(k)`.
* **Forward.** `enter(k)` makes unit k current: the compute stream waits on the event of its
  copy (never the host), the module attributes ("slots") of the unit are swapped to the
  device copies, the previous unit's slots are restored to the host parameters and its copies
  dropped, and unit k+1's copy is issued on the copy stream. The host waits until the device
  has finished the previous unit before issuing the next copy (one event synchronize per
  unit): without it the host runs ahead, the caching allocator cannot reuse the retired
  copies (they are still in use on the compute stream) and every unit ends up resident.
  Each copy is made by an autograd Function (`_Fetch`) whose backward sends the gradient to
  the host parameter's `.grad` (accumulated there), so the optimizer steps on the host copy.
* **Saved tensors.** Autograd would keep every unit's device weights alive until backward
  (Linear saves its weight). A `saved_tensors_hooks` pair replaces a saved tensor whose storage
  is one of the current device copies by a small handle (unit, parameter, view geometry); on
  unpack in backward the unit is fetched again, and the next unit in reverse order is
  prefetched, with the same two-resident policy.
* **Gradients.** On CUDA a weight's gradient is copied on a gradient stream of its own (so it
  crosses the link while the backward's prefetch comes in) into a pinned buffer, with at most
  two units' gradients on the device at a time, and a background thread adds it to the host
  `.grad` once its event completed, so neither the backward's kernel launches nor the compute
  stream wait for the host. `finish_step` (called by the runtime at the end of every step)
  waits for all of them.
* **CPU.** With no streams the same code path runs with real host copies (the "device copy"
  is a fresh tensor), so the CPU test suite checks the grouping, the handles, the order of
  fetches, the freeing and the gradients exactly.

Buffers and graph constants stay resident on the device (they are small). Tied parameters used
by two units are fetched once per unit and their gradients add up on the one host tensor.

With activation recomputation (`recompute=True` in the streamer) each unit is checkpointed on
its own (runtime/unit_recompute.py): in backward `enter(k)` is called again by unit k's
recomputation and takes the copy fetched for unit k's backward (`_enter_backward`), so a
unit's weights are fetched once per microbatch backward and two units stay resident.

Not supported (refused by the runtime with an error naming the stage): the zero-bubble split
backward (BI/BW). Parameter hooks (`register_hook`,
`register_post_accumulate_grad_hook`) do not fire for offloaded parameters; custom autograd
Functions that stash a weight on `ctx` outside `save_for_backward` keep that copy resident.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import queue
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.fx as fx
from torch import nn

__all__ = ["StreamUnit", "WeightStreamer", "keep_weights_on_host", "DEFAULT_MIN_UNIT_BYTES"]

# Units smaller than this are merged with the next ones: each unit costs a host round trip
# (one event synchronize) per forward and backward, which a tiny LayerNorm cannot pay back.
DEFAULT_MIN_UNIT_BYTES = 4 << 20

_STREAMERS: dict[int, "weakref.ref[WeightStreamer]"] = {}
_ids = itertools.count()


def _enter_unit(streamer_id: int, k: int) -> None:
    """The node the rewritten stage graph calls before unit k (module-level so fx can emit it)."""
    ref = _STREAMERS.get(streamer_id)
    streamer = ref() if ref is not None else None
    if streamer is not None:
        streamer.enter(k)


@dataclass(frozen=True, slots=True)
class StreamUnit:
    """A group of parameters that moves to the device together."""

    index: int
    name: str  # the module that owns the unit's first parameter
    slots: tuple[tuple[str, str], ...]  # (module path in the streamed graph module, attribute name)
    slot_param: tuple[int, ...]  # slot i holds params[slot_param[i]]
    params: tuple[nn.Parameter, ...]  # the host parameters, distinct
    nbytes: int


@dataclass(frozen=True, slots=True)
class _Handle:
    """What a saved weight view becomes while the weights are on the host."""

    unit: int
    param: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


@dataclass
class _Resident:
    tensors: list[torch.Tensor]
    event: Any = None  # copy done (CUDA)
    ready: bool = False  # the compute stream has waited on it


@dataclass
class _Stats:
    """What the tests and benchmarks read: fetch order and live copy bytes per phase."""

    fetches: list[tuple[str, int]] = field(default_factory=list)  # ("F" | "B", unit) in issue order
    live_bytes: int = 0
    peak_live_bytes: dict[str, int] = field(default_factory=lambda: {"F": 0, "B": 0})


class _Fetch(torch.autograd.Function):
    """host parameter -> device copy; backward hands the gradient to the streamer (host .grad)."""

    @staticmethod
    def forward(ctx: Any, host: torch.Tensor, streamer: "WeightStreamer", unit: int, index: int) -> torch.Tensor:
        ctx.streamer, ctx.unit, ctx.index = streamer, unit, index
        return streamer._copy(host)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[None, None, None, None]:
        ctx.streamer._grad_arrived(ctx.unit, ctx.index, grad)
        return None, None, None, None  # None: autograd must not accumulate into the host parameter itself


def keep_weights_on_host(objects: dict[str, Any], device: torch.device) -> None:
    """Place an offloaded stage's objects: parameters on the host (pinned when the stage runs
    on CUDA), buffers and constants on `device`. Identities are kept (`.data` is replaced), so
    tied-parameter replicas registered before stay valid."""
    pin = device.type == "cuda" and torch.cuda.is_available()

    def host(p: torch.Tensor) -> None:
        data = p.data if p.device.type == "cpu" else p.data.cpu()
        if pin and not data.is_pinned():
            data = data.pin_memory()
        p.data = data

    def resident(t: torch.Tensor) -> None:
        if t.device != device:
            t.data = t.data.to(device)

    for obj in objects.values():
        if isinstance(obj, nn.Module):
            for mod in obj.modules():
                for p in mod._parameters.values():
                    if p is not None:
                        host(p)
                for b in mod._buffers.values():
                    if b is not None:
                        resident(b)
        elif isinstance(obj, nn.Parameter):
            host(obj)
        elif isinstance(obj, torch.Tensor):
            resident(obj)


def _resolve(root: nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _streamed_module(gm: fx.GraphModule, sid: int, min_unit_bytes: int) -> tuple[fx.GraphModule, list[StreamUnit]]:
    """A copy of `gm` whose graph calls `_enter_unit(sid, k)` before unit k, and the units."""
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    # a parameter read once per use, right before it: the read must see the unit's device copy
    for node in list(graph.nodes):
        if node.op != "get_attr" or not isinstance(_resolve(gm, node.target), nn.Parameter):
            continue
        for user in list(node.users):
            if user.op == "output":
                continue  # a stage returning a weight returns the host parameter
            with graph.inserting_before(user):
                fresh = graph.get_attr(node.target)
            user.replace_input_with(node, fresh)
        if not node.users:
            graph.erase_node(node)

    pos = {n: i for i, n in enumerate(graph.nodes)}
    # sites in graph order: (first node, owner key, slots)
    sites: list[tuple[fx.Node, str, list[tuple[str, str]]]] = []
    for node in graph.nodes:
        slots: list[tuple[str, str]] = []
        first, key = node, None
        if node.op == "call_module":
            sub = gm.get_submodule(node.target)
            for pname, _ in sub.named_parameters(remove_duplicate=False):
                path, _, attr = f"{node.target}.{pname}".rpartition(".")
                slots.append((path, attr))
            key = node.target
        if node.op != "output":
            for a in node.all_input_nodes:
                if a.op == "get_attr" and isinstance(_resolve(gm, a.target), nn.Parameter):
                    path, _, attr = a.target.rpartition(".")
                    slots.append((path, attr))
                    key = key if key is not None else path
                    first = a if pos[a] < pos[first] else first
        if slots:
            sites.append((first, key or "", slots))

    # owner groups, then merged until each unit is at least min_unit_bytes
    groups: list[list[tuple[fx.Node, str, list[tuple[str, str]]]]] = []
    for site in sites:
        if groups and groups[-1][-1][1] == site[1]:
            groups[-1].append(site)
        else:
            groups.append([site])
    units: list[list] = []
    for g in groups:
        if units and _bytes(gm, units[-1]) < min_unit_bytes:
            units[-1].extend(g)
        else:
            units.append(list(g))

    for k, u in enumerate(units):
        with graph.inserting_before(u[0][0]):
            graph.call_function(_enter_unit, (sid, k))
    streamed = fx.GraphModule(gm, graph, type(gm).__name__)
    result = []
    for k, u in enumerate(units):
        slots_k: list[tuple[str, str]] = []
        for _, _, ss in u:
            slots_k += [s for s in ss if s not in slots_k]
        params: list[nn.Parameter] = []
        slot_param = []
        for path, attr in slots_k:
            p = getattr(streamed.get_submodule(path), attr)
            idx = next((i for i, q in enumerate(params) if q is p), None)
            if idx is None:
                idx = len(params)
                params.append(p)
            slot_param.append(idx)
        result.append(StreamUnit(k, u[0][1], tuple(slots_k), tuple(slot_param), tuple(params),
                                 sum(p.numel() * p.element_size() for p in params)))
    return streamed, result


def _bytes(gm: fx.GraphModule, sites: list) -> int:
    seen: dict[int, int] = {}
    for _, _, slots in sites:
        for path, attr in slots:
            p = getattr(gm.get_submodule(path), attr)
            seen[id(p)] = p.numel() * p.element_size()
    return sum(seen.values())


class WeightStreamer:
    """Streams one offloaded stage's weights between host and device (see the module docstring).

    `module` is the rewritten stage module to call inside `forward_scope`; `backward_scope`
    wraps the stage's backward; `finish_step` ends a step (all host gradients final).
    """

    def __init__(self, module: fx.GraphModule, device: torch.device, min_unit_bytes: int | None = None,
                 recompute: bool = False):
        self.device = torch.device(device)
        # the stage also recomputes, one checkpoint per unit (runtime/unit_recompute.py): its
        # backward re-enters each unit, which then takes the copy fetched for that backward
        self.recompute = recompute
        self.cuda = self.device.type == "cuda"
        self._id = next(_ids)
        _STREAMERS[self._id] = weakref.ref(self)
        min_bytes = DEFAULT_MIN_UNIT_BYTES if min_unit_bytes is None else min_unit_bytes
        self.module, self.units = _streamed_module(module, self._id, min_bytes)
        self.stats = _Stats()
        self._phase = "F"
        self._fwd: dict[int, _Resident] = {}
        self._bwd: dict[int, _Resident] = {}
        self._bwd_current: int | None = None
        self._ptrs: dict[int, tuple[int, int]] = {}  # storage pointer of a forward copy -> (unit, param)
        self._saved_units: set[int] = set()  # units whose weights some forward saved for backward
        self._slotted: set[int] = set()  # units whose slots hold backward copies (recomputing)
        self._lock = threading.Lock()
        self.copy_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        # gradients go home on a stream of their own: PCIe is full duplex, so the backward's
        # prefetch (host -> device) and its gradients (device -> host) can cross at once; on
        # one stream they queued behind each other (H100, 12 x Linear(8192) at 512 tokens: a
        # step took three weight crossings, 179 ms against 176 ms for three in series)
        self.grad_stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        self._grads: queue.Queue | None = None
        self._errors: list[BaseException] = []
        self._grad_copies: collections.deque = collections.deque()  # copy events of gradients on the way home
        if self.cuda:
            self._grads = queue.Queue()
            threading.Thread(target=_accumulate_loop, args=(self._grads, self._errors),
                             name=f"fxpipe-offload-grads-{self._id}", daemon=True).start()

    def __del__(self) -> None:
        _STREAMERS.pop(getattr(self, "_id", -1), None)
        if getattr(self, "_grads", None) is not None:
            self._grads.put(None)  # stops the accumulation thread

    @property
    def nbytes(self) -> int:
        """Bytes of the stage's distinct streamed parameters."""
        return sum(p.numel() * p.element_size() for p in {id(p): p for u in self.units for p in u.params}.values())

    # ---- scopes the runtime uses -------------------------------------------------------
    @contextlib.contextmanager
    def forward_scope(self, train: bool) -> Iterator[fx.GraphModule]:
        """Run the stage's forward with `module` inside; with `train`, saved weights become handles."""
        self._phase = "F"
        hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack) if train else contextlib.nullcontext()
        try:
            with hooks:
                yield self.module
        finally:
            for u in list(self._fwd):
                self._retire(self._fwd, u, restore=True)

    @contextlib.contextmanager
    def backward_scope(self) -> Iterator[None]:
        """Wrap a stage backward: the last unit is prefetched, everything is released after."""
        self._phase = "B"
        last = self._previous_saved(len(self.units))
        if last is not None and last not in self._bwd:
            self._bwd[last] = self._issue(last, track=False)
        try:
            yield
        finally:
            for u in self._slotted:  # a recomputed unit's slots hold its backward copies
                self._restore(u)
            self._slotted = set()
            for u in list(self._bwd):
                self._retire(self._bwd, u, restore=False)
            self._bwd_current = None
            self._phase = "F"

    def finish_step(self) -> None:
        """Wait until every gradient of the step has been added to its host parameter."""
        if self.cuda:
            self.copy_stream.synchronize()
            self.grad_stream.synchronize()
            self._grads.join()
        if self._errors:
            e = self._errors[0]
            self._errors.clear()
            raise e

    # ---- forward ---------------------------------------------------------------------
    def enter(self, k: int) -> None:
        """Unit k computes next: its weights on the device, the previous unit's freed, k+1 prefetched.
        In backward (a unit recomputing its forward) the copy is the one fetched for its backward."""
        if self._phase == "B":
            self._enter_backward(k)
            return
        if self.recompute and torch.is_grad_enabled():
            self._saved_units.add(k)  # its recomputation in backward needs all of its weights
        if k not in self._fwd:
            self._fwd[k] = self._issue(k, track=torch.is_grad_enabled())
        res = self._fwd[k]
        self._make_ready(res)
        unit = self.units[k]
        for (path, attr), i in zip(unit.slots, unit.slot_param):
            self._set_slot(path, attr, res.tensors[i])
        for u in [u for u in self._fwd if u != k]:
            self._retire(self._fwd, u, restore=True)
        if torch.is_grad_enabled():
            for i, t in enumerate(res.tensors):
                if t.numel():
                    self._ptrs[t.untyped_storage().data_ptr()] = (k, i)
        if k + 1 < len(self.units) and k + 1 not in self._fwd:
            self._fwd[k + 1] = self._issue(k + 1, track=torch.is_grad_enabled())

    def _enter_backward(self, k: int) -> None:
        for u in self._slotted:  # first, so the retired unit's copies are gone before the prefetch
            if u != k:
                self._restore(u)
        res = self._current_backward(k)
        unit = self.units[k]
        for (path, attr), i in zip(unit.slots, unit.slot_param):
            self._set_slot(path, attr, res.tensors[i])
        self._slotted = {k}

    def _restore(self, u: int) -> None:
        unit = self.units[u]
        for (path, attr), i in zip(unit.slots, unit.slot_param):
            self._set_slot(path, attr, unit.params[i])

    def _set_slot(self, path: str, attr: str, value: torch.Tensor) -> None:
        mod = self.module.get_submodule(path)
        if attr in mod._parameters:
            mod._parameters[attr] = value  # how torch.func.functional_call swaps weights, too
        else:
            setattr(mod, attr, value)

    # ---- saved tensors -------------------------------------------------------------------
    def _pack(self, t: torch.Tensor) -> Any:
        if self._ptrs and t.device == self.device and t.layout == torch.strided:
            try:
                key = self._ptrs.get(t.untyped_storage().data_ptr())
            except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage
                key = None
            if key is not None:
                self._saved_units.add(key[0])
                return _Handle(key[0], key[1], tuple(t.size()), tuple(t.stride()), t.storage_offset())
        return t

    def _unpack(self, x: Any) -> Any:
        if not isinstance(x, _Handle):
            return x
        res = self._current_backward(x.unit)
        return res.tensors[x.param].as_strided(x.size, x.stride, x.offset)

    def _current_backward(self, u: int) -> _Resident:
        if self._bwd_current == u:
            return self._bwd[u]
        if u not in self._bwd:
            self._bwd[u] = self._issue(u, track=False)
        res = self._bwd[u]
        self._make_ready(res)
        # backward walks the units in reverse: keep u and the next one it will need, free the rest
        prev = self._previous_saved(u)
        for other in [v for v in self._bwd if v not in (u, prev)]:
            self._retire(self._bwd, other, restore=False)
        self._bwd_current = u
        if prev is not None and prev not in self._bwd:
            self._bwd[prev] = self._issue(prev, track=False)
        return res

    def _previous_saved(self, u: int) -> int | None:
        """The closest unit before u whose weights a backward reads (units autograd saved nothing of,
        e.g. an embedding table, are not fetched again)."""
        return max((v for v in self._saved_units if v < u), default=None)

    # ---- copies ----------------------------------------------------------------------
    def _copy(self, host: torch.Tensor) -> torch.Tensor:
        # same strides as the host tensor, so a handle's view geometry applies to any copy
        dense = host.is_contiguous() or host.is_non_overlapping_and_dense()
        if self.cuda:
            with torch.cuda.stream(self.copy_stream):
                dst = (torch.empty_strided(host.size(), host.stride(), dtype=host.dtype, device=self.device) if dense
                       else torch.empty(host.size(), dtype=host.dtype, device=self.device))
                dst.copy_(host.detach(), non_blocking=True)
        else:
            dst = host.detach().clone(memory_format=torch.preserve_format if dense else torch.contiguous_format)
            if self.device.type != "cpu":
                dst = dst.to(self.device)
        nbytes = dst.numel() * dst.element_size()
        stats = self.stats
        with self._lock:
            stats.live_bytes += nbytes
            stats.peak_live_bytes[self._phase] = max(stats.peak_live_bytes.get(self._phase, 0), stats.live_bytes)
        weakref.finalize(dst, self._freed, nbytes)
        return dst

    def _freed(self, nbytes: int) -> None:
        with self._lock:
            self.stats.live_bytes -= nbytes

    def _issue(self, k: int, track: bool) -> _Resident:
        unit = self.units[k]
        self.stats.fetches.append((self._phase, k))
        if track:
            tensors = [_Fetch.apply(p, self, k, i) if p.requires_grad else self._copy(p) for i, p in enumerate(unit.params)]
        elif self.recompute and self._phase == "B":
            # a recomputation must save what the forward saved, and autograd saves some
            # tensors only when the weight requires grad; its gradient goes through the
            # forward's _Fetch, the recomputed graph itself is never differentiated
            tensors = [self._copy(p).requires_grad_(p.requires_grad) for p in unit.params]
        else:
            tensors = [self._copy(p) for p in unit.params]
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        return _Resident(tensors, event)

    def _make_ready(self, res: _Resident) -> None:
        if res.ready:
            return
        if self.cuda:
            stream = torch.cuda.current_stream(self.device)
            stream.wait_event(res.event)  # the device waits for the copy, the host does not
            for t in res.tensors:
                t.record_stream(stream)  # allocated on the copy stream, used on this one
        res.ready = True

    def _retire(self, table: dict[int, _Resident], u: int, restore: bool) -> None:
        res = table.pop(u)
        if restore:
            unit = self.units[u]
            for (path, attr), i in zip(unit.slots, unit.slot_param):
                self._set_slot(path, attr, unit.params[i])
        for t in res.tensors:
            if t.numel():
                self._ptrs.pop(t.untyped_storage().data_ptr(), None)
        if self.cuda and res.ready:
            # the host waits until the device has finished with these weights: only then can
            # the allocator give their memory to the next copy (else every unit piles up)
            done = torch.cuda.Event()
            done.record(torch.cuda.current_stream(self.device))
            done.synchronize()

    # ---- gradients -----------------------------------------------------------------------
    def _grad_arrived(self, u: int, i: int, grad: torch.Tensor) -> None:
        host = self.units[u].params[i]
        if not self.cuda:
            _accumulate(host, grad.to(host.device), owned=False)
            return
        stream = torch.cuda.current_stream(self.device)
        self.grad_stream.wait_stream(stream)
        with torch.cuda.stream(self.grad_stream):
            buf = torch.empty(grad.shape, dtype=grad.dtype, pin_memory=True)
            buf.copy_(grad, non_blocking=True)
        grad.record_stream(self.grad_stream)
        event = torch.cuda.Event()
        event.record(self.grad_stream)
        self._grads.put((event, buf, host))
        # at most one unit's gradients left on the device waiting for their copy home when the
        # next unit's backward starts, so with the gradients that one computes there are two
        # units' gradients at a time -- the planner's double buffer (weight_buffer: two units'
        # weights and gradients). The backward (autograd's device thread) waits here; the wait
        # is for the copy issued one unit earlier, which had that unit's compute to cross.
        self._grad_copies.append(event)
        while len(self._grad_copies) > len(self.units[u].params):
            self._grad_copies.popleft().synchronize()



def _accumulate_loop(grads: queue.Queue, errors: list[BaseException]) -> None:
    """The gradient thread of one streamer: add each arrived gradient to its host `.grad`.
    It holds the queue, not the streamer, so a dropped streamer is collected and its
    `__del__` ends the thread."""
    while True:
        item = grads.get()
        if item is None:
            grads.task_done()
            return
        try:
            event, buf, host = item
            event.synchronize()
            _accumulate(host, buf, owned=True)
        except BaseException as e:  # reported by finish_step
            errors.append(e)
        finally:
            grads.task_done()


def _accumulate(host: torch.Tensor, grad: torch.Tensor, owned: bool) -> None:
    """host.grad += grad, as autograd's AccumulateGrad would (a fresh tensor the first time)."""
    with torch.no_grad():
        if host.grad is None:
            host.grad = grad if owned and grad.is_contiguous() else grad.detach().clone(memory_format=torch.contiguous_format)
        else:
            host.grad.add_(grad)
