"""How close is fxpipe's prediction to a real run: step time and peak activation memory?

On 2 CPU workers, for an MLP (8 blocks Linear(512,2048)-GELU-Linear(2048,512), batch 128,
8 microbatches) and GPT-2 small (config defaults, random weights, dropout on), for 1F1B and
ZB-H1: the measured step (median of `steps` after `warmup`) against `fxpipe.simulate(plan)`
with roofline costs and with profiled costs (`profile=True`), and the measured peak
activation memory per device (`step(..., trace=...)`: bytes autograd saved) against the
simulated one, and the measured peak of allocated tensor bytes per device (`peak_allocated`
below: every storage a device's ops create, parameter gradients excluded) against the
simulator's activations + backward transients. Targets: step within 20% (profiled), memory
within 15%.

    python3 benchmarks/measured_vs_simulated.py          # writes benchmarks/results/measured_vs_simulated.{json,md}
    python3 benchmarks/measured_vs_simulated.py --quick  # small shapes, for a smoke run

Traces for side-by-side viewing (chrome://tracing, ui.perfetto.dev) go to
benchmarks/results/measured_vs_simulated/<model>_<schedule>_<costs>_{measured,predicted}.trace.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import threading

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxpipe  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


class _Book:
    """Live CPU tensor storages one device's worker allocated, their bytes now and at the peak.

    A storage is counted from the op that made it until it is freed. Frees are not observed as
    they happen (a storage's Python object dies before the storage when autograd still holds
    it), so each entry keeps a weak reference to the storage and `now` over-counts until a
    sweep drops the expired ones; a sweep runs whenever `now` would set a new peak, so the peak
    is exact. Parameter gradients are static memory: `to_static` takes them out.
    """

    def __init__(self, static: dict[int, StorageWeakRef]) -> None:
        self.static = static  # shared by all devices' books: storages that became a `.grad`
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def add(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        n, ptr = st.nbytes(), st.data_ptr()
        if n == 0:
            return
        with self.lock:
            if ptr in self.static and not self.static[ptr].expired():
                return  # a gradient accumulated in place
            old = self.live.get(ptr)
            if old is not None and not old[0].expired():
                return  # a view or an in-place result: storage already counted
            if old is not None:
                self.now -= old[1]
            self.live[ptr] = (StorageWeakRef(st), n)
            self.now += n
            if self.now > self.peak:
                self._sweep()
                self.peak = max(self.peak, self.now)

    def _sweep(self) -> None:
        for ptr, (ref, n) in list(self.live.items()):
            if ref.expired():
                del self.live[ptr]
                self.now -= n

    def to_static(self, t: torch.Tensor) -> None:
        with self.lock:
            ptr = t.untyped_storage().data_ptr()
            self.static[ptr] = StorageWeakRef(t.untyped_storage())
            e = self.live.pop(ptr, None)
            if e is not None:
                self.now -= e[1]


class _Allocations(TorchDispatchMode):
    """Records every new tensor of `device_type` an op returns in one device's `_Book`
    (forward and backward: autograd runs the backward under the caller's dispatch modes)."""

    def __init__(self, book: _Book, device_type: str = "cpu") -> None:
        super().__init__()
        self.book, self.device_type = book, device_type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place op returns an input's storage (a weight's, through `t`): not new
        given = {x.untyped_storage().data_ptr() for x in pytree.tree_leaves((args, kwargs))
                 if isinstance(x, torch.Tensor) and x.device.type == self.device_type}
        for t in pytree.tree_leaves(out):
            if (isinstance(t, torch.Tensor) and t.device.type == self.device_type
                    and t.untyped_storage().data_ptr() not in given):
                self.book.add(t)
        return out


def peak_allocated(cm, inputs: dict, target, loss_fn, device_type: str = "cpu") -> list[float]:
    """Per device, the peak bytes of tensors (on `device_type`) its worker allocated during
    one training step, parameter gradients excluded (static memory, not activations or
    backward transients): on CPU the counterpart of `torch.cuda.max_memory_allocated` above
    the memory before a step; on CUDA the same count without allocator workspaces.

    Each device's generated program runs under a dispatch mode that books the storages its
    ops create (this reaches into the CompiledModel's programs: a benchmark-only probe)."""
    static: dict[int, StorageWeakRef] = {}
    books = [_Book(static) for _ in cm._train_prog]

    def under(book: _Book, prog):
        def run(rt):
            with _Allocations(book, device_type):
                prog(rt)
        return run

    params = [q for q in cm.model.parameters() if q.requires_grad] + [r for _, r in cm._replicas if r.requires_grad]

    def static(q: torch.Tensor) -> None:
        for bk in books:
            bk.to_static(q.grad)

    hooks = [q.register_post_accumulate_grad_hook(static) for q in params]
    saved = cm._train_prog
    cm._train_prog = [(src, under(bk, f)) for bk, (src, f) in zip(books, saved)]
    try:
        cm.zero_grad()
        cm.step(**inputs, target=target, loss_fn=loss_fn)
    finally:
        cm._train_prog = saved
        for h in hooks:
            h.remove()
    return [float(bk.peak) for bk in books]


@dataclass
class Config:
    models: tuple[str, ...] = ("mlp", "gpt2")
    schedules: tuple[str, ...] = ("1f1b", "zb-h1")
    devices: int = 2
    # MLP
    blocks: int = 8
    hidden: int = 512
    ffn: int = 2048
    batch: int = 128
    microbatches: int = 8
    # GPT-2 small (config defaults: 12 layers, 768 wide, vocab 50257)
    gpt2_batch: int = 4
    gpt2_seq: int = 128
    gpt2_microbatches: int = 4
    gpt2_layers: int = 12
    steps: int = 3
    warmup: int = 1
    step_target: float = 0.20
    memory_target: float = 0.15
    notes: list[str] = field(default_factory=list)


def make(name: str, c: Config):
    """(model, example inputs as kwargs, target, loss_fn, microbatches)"""
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(*[nn.Sequential(nn.Linear(c.hidden, c.ffn), nn.GELU(), nn.Linear(c.ffn, c.hidden))
                                for _ in range(c.blocks)])
        x, t = torch.randn(c.batch, c.hidden), torch.randn(c.batch, c.hidden)
        return model, {"input": x}, t, F.mse_loss, c.microbatches
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(use_cache=False, n_positions=max(c.gpt2_seq, 128), n_layer=c.gpt2_layers)
    model = GPT2LMHeadModel(cfg).train()
    ids = torch.randint(0, cfg.vocab_size, (c.gpt2_batch, c.gpt2_seq))

    def lm_loss(out, t):
        return F.cross_entropy(out["logits"].flatten(0, 1), t.flatten())

    return model, {"input_ids": ids}, ids, lm_loss, c.gpt2_microbatches


def _busy_by_op(events) -> dict[str, float]:
    """Seconds of compute per instruction kind (FWD, BWD, BI, BW), summed over devices."""
    out: dict[str, float] = {}
    for e in events:
        if e.lane == "compute" and not e.instr.op.name.startswith("RECV"):
            out[e.instr.op.name] = out.get(e.instr.op.name, 0.0) + e.end - e.start
    return out


def measure(name: str, schedule: str, costs: str, c: Config, trace_dir: Path) -> dict:
    model, inputs, target, loss_fn, m = make(name, c)
    load = [round(os.getloadavg()[0], 2)]
    t0 = time.perf_counter()
    cm = fxpipe.compile(model, ["cpu"] * c.devices, inputs, microbatches=m, schedule=schedule,
                        profile=costs == "profiled")
    compile_s = time.perf_counter() - t0
    for _ in range(c.warmup):
        cm.step(**inputs, target=target, loss_fn=loss_fn)
    times = []
    for _ in range(c.steps):
        cm.zero_grad()  # as a training loop does: no step adds into the previous gradients
        t0 = time.perf_counter()
        cm.step(**inputs, target=target, loss_fn=loss_fn)
        times.append(time.perf_counter() - t0)
    stem = f"{name}_{schedule}_{costs}"
    cm.zero_grad()
    t0 = time.perf_counter()
    cm.step(**inputs, target=target, loss_fn=loss_fn, trace=str(trace_dir / f"{stem}_measured.trace.json"))
    recorded_wall = time.perf_counter() - t0
    recorded = cm.last_timeline
    sim = fxpipe.simulate(cm.plan)
    (trace_dir / f"{stem}_predicted.trace.json").write_text(json.dumps(sim.to_chrome_trace()))
    alloc_meas = peak_allocated(cm, inputs, target, loss_fn)
    load.append(round(os.getloadavg()[0], 2))
    measured = statistics.median(times)
    mem_meas, mem_sim = list(cm.last_memory), list(sim.peak_memory)
    alloc_sim = list(sim.peak_allocated)
    return {
        "model": name, "schedule": schedule, "costs": costs, "compile_s": round(compile_s, 2),
        "load_average_1min": load,
        "stages": [list(s.units) for s in cm.plan.stages],
        "step_measured_s": measured, "step_times_s": times, "step_recorded_s": recorded.step_time,
        # the recorded step's wall time minus its programs' span: splitting the batch, replica
        # sync and gradient hand-back, outside the schedule (and not simulated)
        "outside_programs_s": recorded_wall - recorded.step_time,
        "busy_measured_s": _busy_by_op(recorded.events), "busy_predicted_s": _busy_by_op(sim.events),
        "step_predicted_s": sim.step_time, "step_error": sim.step_time / measured - 1,
        "peak_act_measured_bytes": mem_meas, "peak_act_predicted_bytes": mem_sim,
        "memory_error": [s / mm - 1 if mm else 0.0 for s, mm in zip(mem_sim, mem_meas)],
        "peak_alloc_measured_bytes": alloc_meas, "peak_alloc_predicted_bytes": alloc_sim,
        "alloc_error": [s / mm - 1 if mm else 0.0 for s, mm in zip(alloc_sim, alloc_meas)],
    }


def table(rows: list[dict], c: Config) -> str:
    mib = 2**20
    out = ["| model | schedule | costs | measured step s | predicted s | error | peak act. measured MiB | predicted MiB "
           "| error | peak alloc. measured MiB | predicted MiB | error |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def mem(r: dict, kind: str) -> str:
        ok = "" if all(abs(e) <= c.memory_target for e in r[f"{kind}_error"]) else " ✗"
        return (f"{' / '.join(f'{b / mib:.1f}' for b in r[f'peak_{kind}_measured_bytes'])} | "
                f"{' / '.join(f'{b / mib:.1f}' for b in r[f'peak_{kind}_predicted_bytes'])} | "
                f"{' / '.join(f'{100 * e:+.1f}%' for e in r[f'{kind}_error'])}{ok}")

    for r in rows:
        ok_t = "" if r["costs"] == "roofline" or abs(r["step_error"]) <= c.step_target else " ✗"
        r = {**r, "act_error": r["memory_error"]}
        alloc = mem(r, "alloc") if "alloc_error" in r else "- | - | -"
        out.append(f"| {r['model']} | {r['schedule']} | {r['costs']} | {r['step_measured_s']:.3f} | "
                   f"{r['step_predicted_s']:.3f} | {100 * r['step_error']:+.0f}%{ok_t} | {mem(r, 'act')} | {alloc} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small shapes for a smoke run")
    ap.add_argument("--models", default=None, help="comma-separated subset of mlp,gpt2")
    a = ap.parse_args()
    c = Config()
    if a.quick:
        c = Config(blocks=4, hidden=128, ffn=512, batch=32, gpt2_layers=2, gpt2_batch=4, gpt2_seq=32, steps=2)
    if a.models:
        c.models = tuple(a.models.split(","))
    trace_dir = OUT / "measured_vs_simulated"
    trace_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in c.models:
        for schedule in c.schedules:
            for costs in ("roofline", "profiled"):
                r = measure(name, schedule, costs, c, trace_dir)
                print(f"{name} {schedule} {costs}: measured {r['step_measured_s']:.3f}s predicted "
                      f"{r['step_predicted_s']:.3f}s; memory error {[round(100 * e, 1) for e in r['memory_error']]}%",
                      file=sys.stderr, flush=True)
                rows.append(r)
    env = {"torch": torch.__version__, "threads": torch.get_num_threads(), "python": sys.version.split()[0],
           "load_average_1min": round(os.getloadavg()[0], 2)}
    suffix = "_quick" if a.quick else ""
    old = OUT / f"measured_vs_simulated{suffix}.json"
    if a.models and old.exists():  # a partial re-run replaces its own rows and keeps the others
        done = {(r["model"], r["schedule"], r["costs"]) for r in rows}
        rows = [r for r in json.loads(old.read_text())["rows"] if (r["model"], r["schedule"], r["costs"]) not in done] + rows
        order = Config().models
        rows.sort(key=lambda r: (order.index(r["model"]) if r["model"] in order else len(order), r["schedule"],
                                 r["costs"] != "roofline"))
    (OUT / f"measured_vs_simulated{suffix}.json").write_text(
        json.dumps({"config": asdict(c), "env": env, "rows": rows}, indent=1))
    md = [f"# Measured vs simulated ({c.devices} CPU workers)", "",
          f"Step: median of {c.steps} after {c.warmup} warm-up (gradients zeroed before each, as a training "
          f"loop does); target within {100 * c.step_target:.0f}% with profiled costs. Peak activation memory "
          f"per device (d0 / d1): bytes autograd saved for backward (simulator: `peak_memory`). Peak "
          f"allocated: the most bytes of tensors a device's ops had allocated at once during a step, "
          f"parameter gradients excluded (simulator: `peak_allocated`, activations + backward transients + "
          f"what BI keeps for BW). Memory targets within {100 * c.memory_target:.0f}%. "
          f"Error = predicted / measured - 1.", "",
          table(rows, c), "", f"Environment: {env} (load average when written; timings are only as good as the "
          "machine was quiet)"]
    (OUT / f"measured_vs_simulated{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
