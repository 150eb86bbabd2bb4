"""Profile: measure each unit's forward and backward time on the real device.

The roofline of `annotate_costs` is a model; this pass replaces it with the clock. Every
unit becomes its own fx graph with explicit inputs (`split_stages` with one stage per unit),
runs on the example microbatch on the device, and is timed: a few warm-up runs, then the
median of `repeats` runs of the forward, and of the backward (input and weight gradients,
through `torch.autograd.grad`, so the user's `.grad` is never touched). The backward is also
timed split the way the zero-bubble runtime splits it (`runtime/weight_grad.py`: BI, the input
gradients, then BW, the weight gradients, on the unit rewritten to expose its weight
consumers), and each unit's BI share BI / (BI + BW) is returned, so ZB-H1 is simulated with
measured BI and BW times rather than half and half (`.grad` is put back afterwards). CPU workers of one
host share its memory bandwidth, so on CPU as many copies of the unit run at once as the
cluster has CPU workers (alone, a bandwidth-bound unit runs up to ~1.7x faster than in the
pipeline). On CUDA a unit costs max(host time issuing it, GPU time running it back to back);
see `_clock`.

Example:
    >>> fwd, bwd, bi = profile_units(gm, model, flat_mb, [dev])         # doctest: +SKIP
    >>> costs = costs.with_measured(fwd, bwd, bi)                       # doctest: +SKIP
"""

from __future__ import annotations

import copy
import statistics
import sys
import threading
import time
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from fxpipe.compiler.cluster import Device
from fxpipe.errors import PlanError
from fxpipe.passes.annotate_costs import device_key
from fxpipe.passes.split_stages import build_stage_module, resolve_attr, split_stages
from fxpipe.runtime.weight_grad import SplitState, backward_input, backward_weight, split_backward_module, trainable_consumers

__all__ = ["profile_units"]


def profile_units(gm: fx.GraphModule, model: nn.Module, example_inputs: Sequence[torch.Tensor],
                  devices: Sequence[Device], *, train: bool = True, warmup: int = 2, repeats: int = 5,
                  progress: bool = False) -> tuple[dict[str, tuple[float, ...]], dict[str, tuple[float, ...]],
                                                   dict[str, tuple[float, ...]]]:
    """Time every unit of `gm` on each distinct kind of device in `devices`.

    Reads `node.meta["fxpipe.unit"]` (run `group_units` first). Does not mutate `gm`, the
    model's parameters or their `.grad`.

    Args:
        gm: the captured graph.
        model: the user's model (its parameters back the graph's attributes; they must be real,
            not on the meta device).
        example_inputs: the graph's flat inputs for one microbatch (the size planning prices).
        devices: the cluster's devices; one measurement per `device_key` (CPU workers with the
            same thread count share one).
        train: also time the backward (else backward times are 0).
        warmup, repeats: runs before timing, and timed runs whose median is kept.
        progress: one line per device kind and unit on stderr.

    Returns:
        (forward, backward, bi_fraction): per device key, seconds per microbatch for each
        unit, and each unit's measured BI / (BI + BW) of its split backward (0.5 where there
        is no backward).
    """
    if any(t.is_meta for t in list(model.parameters()) + list(model.buffers())):
        raise PlanError("profile=True runs every unit on the device, but the model's parameters are on the meta "
                        "device: materialize them first, or plan with profile=False (roofline costs)")
    n = 1 + max(n.meta["fxpipe.unit"] for n in gm.graph.nodes if "fxpipe.unit" in n.meta)
    graphs = split_stages(gm, [(u, u + 1) for u in range(n)])
    names = [n.target for n in gm.graph.nodes if n.op == "placeholder"]
    fwd: dict[str, tuple[float, ...]] = {}
    bwd: dict[str, tuple[float, ...]] = {}
    bi: dict[str, tuple[float, ...]] = {}
    # the timed runs may update buffers (BatchNorm's running statistics): put them back after
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        _profile_devices(graphs, gm, model, dict(zip(names, example_inputs)), devices, train, warmup, repeats,
                         progress, fwd, bwd, bi)
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
    return fwd, bwd, bi


def _existing_device(dev: Device) -> torch.device:
    """The torch device `dev` is here; PlanError when it is not on this machine (a cluster
    file's "gpu0", or "cuda:1" on a machine with one GPU), before anything runs on it."""
    if dev.kind == "cpu":
        return torch.device("cpu")  # a CPU worker's name is only a label ("cpu-big")
    fix = ("profile=True times units on this machine's devices; give --devices/devices that exist here "
           "(e.g. 'cpu,cpu'), or plan with profile=False (roofline costs) for a cluster file")
    try:
        tdev = torch.device(dev.name)
    except RuntimeError:
        raise PlanError(f"device {dev.name!r} (kind {dev.kind}) is not a device of this machine: {fix}") from None
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if tdev.type != "cuda" or (tdev.index or 0) >= n:
        raise PlanError(f"device {dev.name!r} (kind {dev.kind}) does not exist here (this machine has {n} CUDA "
                        f"device(s)): {fix}")
    return tdev


def _profile_devices(graphs: list, gm: fx.GraphModule, model: nn.Module, inputs: dict[str, torch.Tensor],
                     devices: Sequence[Device], train: bool, warmup: int, repeats: int, progress: bool,
                     fwd: dict, bwd: dict, bi: dict) -> None:
    for dev in devices:
        key = device_key(dev)
        if key in fwd:
            continue
        if dev.kind == "meta":
            raise PlanError(f"profile=True needs devices that exist on this machine; device {dev.name!r} is 'meta': "
                            "plan with profile=False (roofline costs) instead")
        tdev = _existing_device(dev)
        prev = torch.get_num_threads()
        if dev.kind == "cpu":
            torch.set_num_threads(dev.threads)  # what the runtime's worker for it uses
        # CPU workers share the host's memory bandwidth and caches: time a unit while as many
        # copies of it run as the cluster has CPU workers, which is how the pipeline runs it
        copies = sum(1 for d in devices if d.kind == "cpu") if dev.kind == "cpu" else 1
        try:
            f, b, frac = _profile_device(graphs, gm, model, inputs, tdev, train, warmup, repeats, progress, key,
                                         copies, dev.threads)
        finally:
            torch.set_num_threads(prev)
        fwd[key], bwd[key], bi[key] = tuple(f), tuple(b), tuple(frac)


def _profile_device(graphs: list, gm: fx.GraphModule, model: nn.Module, inputs: dict[str, torch.Tensor],
                    dev: torch.device, train: bool, warmup: int, repeats: int, progress: bool,
                    key: str, copies: int = 1, threads: int = 1) -> tuple[list[float], list[float], list[float]]:
    values: dict[str, Any] = {}  # boundary values by name, produced by earlier units
    fwd_t, bwd_t, frac_t = [], [], []
    call = _backward_call_overhead(dev, warmup, repeats) if train else 0.0
    for sg in graphs:
        objects = {t: _on(resolve_attr(model, gm, t), dev) for t in sg.attrs + sg.modules}
        mod = build_stage_module(sg, objects, dev)
        recv = [_on(values[r], dev) for r in sg.recv]
        model_in = [_on(inputs[i], dev) for i in sg.model_inputs]
        params = [p for p in mod.parameters() if p.requires_grad]
        with torch.no_grad():
            out = mod(*recv, *model_in)

        # the other copies get their own weights: two pipeline stages never share a cache line
        mods = [mod] + [copy.deepcopy(mod) for _ in range(copies - 1)]

        # a training forward records autograd's graph and saves tensors for backward (the
        # runtime's received values are leaves that require grad): time that, not a no_grad
        # forward, which is measurably cheaper (MLP blocks on CPU: ~25%)
        grad_in = [r.detach().requires_grad_(True) if train and isinstance(r, torch.Tensor) and (r.is_floating_point() or r.is_complex())
                   else r for r in recv]

        def forward_of(i: int) -> Callable[[], None]:
            def forward() -> None:
                with torch.set_grad_enabled(train):
                    mods[i](*grad_in, *model_in)
            return forward

        tf = _concurrently(lambda i: _time(forward_of(i), dev, warmup, repeats), copies, threads)
        tb, tbi, tbw = 0.0, 0.0, 0.0
        if train:
            leaves = [r.detach().requires_grad_(True) if isinstance(r, torch.Tensor) and (r.is_floating_point() or r.is_complex()) else r
                      for r in recv]
            inputs_wrt = [x for x in leaves if isinstance(x, torch.Tensor) and x.requires_grad]
            if inputs_wrt or params:
                tb = _concurrently(lambda i: _time_backward(
                    mods[i], leaves, model_in, inputs_wrt + [q for q in mods[i].parameters() if q.requires_grad],
                    dev, warmup, repeats), copies, threads)
                tbi, tbw = _concurrently(lambda i: _time_split_backward(mods[i], leaves, model_in, dev, warmup,
                                                                        repeats), copies, threads)
        # each unit's backward was its own autograd call; in a step the stage's backward is one
        tb, tbi, tbw = max(0.0, tb - call), max(0.0, tbi - call), max(0.0, tbw - call)
        fwd_t.append(tf)
        bwd_t.append(tb)
        frac_t.append(tbi / (tbi + tbw) if tbi + tbw > 0 else 0.5)
        for name, v in zip(sg.send, out):
            values[name] = v.detach() if isinstance(v, torch.Tensor) else v
        if progress:  # (the first line ends the open "fxpipe: profile ..." phase line)
            print(f"{chr(10) if len(fwd_t) == 1 else ''}fxpipe: profile {key} unit {len(fwd_t)}/{len(graphs)}: "
                  f"fwd {tf * 1e3:.3f} ms, bwd {tb * 1e3:.3f} ms (split: BI {tbi * 1e3:.3f} + BW {tbw * 1e3:.3f} ms)",
                  file=sys.stderr, flush=True)
    return fwd_t, bwd_t, frac_t


def _time_backward(mod: fx.GraphModule, leaves: list, model_in: list, wrt: list, dev: torch.device, warmup: int,
                   repeats: int) -> float:
    """Median seconds of the backward alone (each run does its own forward, untimed), run as the
    runtime's BWD runs it: `autograd.backward` accumulating into the parameters' existing
    `.grad` (so the in-place accumulation every microbatch after a step's first pays is in
    the time) and into the stage inputs' `.grad`. The parameters' `.grad` are put back after."""
    params = [q for q in wrt if isinstance(q, nn.Parameter)]
    kept = [q.grad for q in params]
    times = []
    try:
        for q in params:
            q.grad = None
        for i in range(warmup + repeats):
            # fresh input leaves per run: concurrent copies share `leaves` and must not share .grad
            lv = [x.detach().requires_grad_(True) if isinstance(x, torch.Tensor) and x.requires_grad else x
                  for x in leaves]
            with torch.enable_grad():
                outs = [o for o in mod(*lv, *model_in) if isinstance(o, torch.Tensor) and o.requires_grad]
            if not outs:
                return 0.0
            grads = [torch.ones_like(o) for o in outs]
            t = _clock(lambda: torch.autograd.backward(outs, grads), dev)
            if i >= warmup:
                times.append(t)
    finally:
        for q, g in zip(params, kept):
            q.grad = g
    return statistics.median(times)


def _time_split_backward(mod: fx.GraphModule, leaves: list, model_in: list, dev: torch.device, warmup: int,
                         repeats: int) -> tuple[float, float]:
    """Median seconds of BI and of BW, run as the zero-bubble runtime runs them (each run does
    its own forward, untimed). BW accumulates into `.grad`, as in a step; the parameters'
    `.grad` (the user's, on CPU) are put back afterwards."""
    split, n_out, consumers = split_backward_module(mod)
    params = dict(split.named_parameters())
    kept = {name: p.grad for name, p in params.items()}
    # BI keeps only the gradients BW will use, as the runtime does (frozen consumers' are not kept)
    keep = trainable_consumers(consumers, params)
    bi_t, bw_t = [], []
    try:
        for p in params.values():
            p.grad = None
        for i in range(warmup + repeats):
            with torch.enable_grad():
                out = list(split(*leaves, *model_in))
            outs, consumer_out = out[:n_out], out[n_out:]
            grads = [torch.ones_like(o) if isinstance(o, torch.Tensor) and o.requires_grad else None for o in outs]
            if not any(g is not None for g in grads):
                return 0.0, 0.0
            state = SplitState(outs, grads, consumer_out, keep=keep)
            t_bi = _clock(lambda: backward_input(state, leaves), dev)
            t_bw = _clock(lambda: backward_weight(state, consumers, params), dev)
            if i >= warmup:
                bi_t.append(t_bi)
                bw_t.append(t_bw)
    finally:
        for name, p in params.items():
            p.grad = kept[name]
    return statistics.median(bi_t), statistics.median(bw_t)


def _backward_call_overhead(dev: torch.device, warmup: int, repeats: int) -> float:
    """Seconds one `torch.autograd.backward` call costs beyond its work, on CUDA: the engine
    hands the graph to its device thread and waits for it (GPT-2 small on an H100: ~45 units,
    each timed as its own call, over-predicted the step by ~20%). The pipeline runs a stage's
    backward as one call, so the profiler subtracts this from every unit's backward. On a
    CPU the backward runs in the calling thread and nothing is subtracted."""
    if dev.type != "cuda":
        return 0.0
    x = torch.ones(1, device=dev, requires_grad=True)
    times = []
    for i in range(warmup + max(repeats, 5)):
        with torch.enable_grad():
            y = x * 2.0
        g = torch.ones_like(y)
        t = _clock(lambda: torch.autograd.backward([y], [g]), dev)
        if i >= warmup:
            times.append(t)
    return statistics.median(times)


def _concurrently(measure: Callable[[int], Any], copies: int, threads: int) -> Any:
    """The mean of `measure(i)` run by `copies` threads at once (each with `threads` intra-op
    threads); a tuple result is averaged element by element."""
    if copies <= 1:
        return measure(0)
    results: list[Any] = [0.0] * copies
    errors: list[BaseException] = []
    barrier = threading.Barrier(copies)

    def run(i: int) -> None:
        try:
            torch.set_num_threads(threads)
            barrier.wait()
            results[i] = measure(i)
        except BaseException as e:  # re-raised in the calling thread
            errors.append(e)
            barrier.abort()

    others = [threading.Thread(target=run, args=(i,), daemon=True) for i in range(1, copies)]
    for t in others:
        t.start()
    run(0)
    for t in others:
        t.join()
    real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
    if real or errors:
        raise (real or errors)[0]
    if isinstance(results[0], tuple):
        return tuple(statistics.mean(r[k] for r in results) for k in range(len(results[0])))
    return statistics.mean(results)


def _time(fn: Callable[[], None], dev: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        _clock(fn, dev)
    return statistics.median(_clock(fn, dev) for _ in range(repeats))


# Host seconds the last CUDA measurement spent issuing its work, per device: the next one
# queues a spin at least that long ahead of its work (see `_clock`).
_HOST_HINT: dict[int, float] = {}
_SPIN_HZ = 2.0e9  # GPU clock assumed for torch.cuda._sleep cycles; a slower clock only spins longer


def _clock(fn: Callable[[], Any], dev: torch.device) -> float:
    """Seconds `fn` costs on `dev`. On CUDA that is max(host time issuing it, GPU time running
    it): in a pipeline step the host issues a unit while the GPU still runs the previous one,
    so neither the GPU's idle wait for a slow host nor the host's wait for a slow GPU belongs
    to one unit alone. The GPU time is taken with the queue full: a spin kernel longer than
    the host's issuing goes first, so the events bracket the unit's kernels back to back
    (events around a unit issued into an idle GPU add the launch gaps: GPT-2 small, host
    bound, was over-predicted by 33% on an H100)."""
    if dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(dev)
        hint = _HOST_HINT.get(index, 1e-3)
        torch.cuda._sleep(int(min(0.2, 2.0 * hint + 2e-4) * _SPIN_HZ))
        start.record()
        t = time.perf_counter()
        fn()
        host = time.perf_counter() - t
        end.record()
        torch.cuda.synchronize(dev)
        _HOST_HINT[index] = max(host, 0.5 * hint)
        return max(host, start.elapsed_time(end) / 1e3)
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def _on(obj: Any, dev: torch.device) -> Any:
    """`obj` on `dev`: itself when already there (the user's objects are never moved), else a copy."""
    if isinstance(obj, nn.Module):
        tensors = list(obj.parameters()) + list(obj.buffers())
        return obj if all(t.device == dev for t in tensors) else copy.deepcopy(obj).to(dev)
    if isinstance(obj, torch.Tensor) and obj.device != dev:
        t = obj.detach().to(dev)
        return nn.Parameter(t, requires_grad=obj.requires_grad) if isinstance(obj, nn.Parameter) else t
    return obj
