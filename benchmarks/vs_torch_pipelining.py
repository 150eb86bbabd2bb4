"""fxpipe's distributed runtime against torch.distributed.pipelining, same model, split and schedule.

8 blocks of Linear(1024,4096)-GELU-Linear(4096,1024), batch 256, 8 microbatches, 1F1B,
2 ranks on gloo/CPU, 4 blocks per stage, one intra-op thread per rank (this machine has 2
cores). fxpipe plans the model itself (the plan's cut is checked to be the same 4/4 split);
torch.distributed.pipelining gets each rank's 4 blocks as its PipelineStage, Schedule1F1B,
MSE loss. Both run in the same two processes, their steps alternating (so that other load
on the machine slows both alike). Each step is timed from a barrier to a barrier; the figure is the median of `steps` steps after `warmup` steps. For
reference, the whole model's step in one single-threaded process is timed too (the ideal
2-stage pipeline takes about half of it plus the bubble).

The compute floor: each rank's own 4 blocks run for the same 8 microbatches of 32 rows,
forward then backward, with no pipeline and no messages: alone (the other rank waits at a
barrier) and with both ranks at once (what a 2-rank pipeline can reach at best on these 2
cores, which also share caches, memory bandwidth and whatever else runs on the machine).
The same blocks at the whole batch (one 256-row microbatch) show the cost of small GEMMs.
Per fxpipe step and rank: time inside forward / backward / receive waits / sends, the rest
(the runtime's Python, zero_grad, the loss broadcast), the intra-op threads the rank ran
with, the process's CPU time (all threads, gloo's included) and its minor page faults.

    python3 benchmarks/vs_torch_pipelining.py           # writes benchmarks/results/vs_torch_pipelining.{json,md}
    python3 benchmarks/vs_torch_pipelining.py --quick   # smaller model, smoke run (results not written)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks._models import mlp_blocks  # noqa: E402


@dataclass
class Config:
    blocks: int = 8
    hidden: int = 1024
    ffn: int = 4096
    batch: int = 256
    microbatches: int = 8
    ranks: int = 2
    steps: int = 3
    warmup: int = 1


def make_model(cfg: Config) -> nn.Sequential:
    return mlp_blocks(cfg.blocks, cfg.hidden, cfg.ffn)


def data(cfg: Config) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(cfg.batch, cfg.hidden, generator=g), torch.randn(cfg.batch, cfg.hidden, generator=g)


def fxpipe_runner(cfg: Config, rank: int) -> tuple[Callable[[], Any], dict]:
    from fxpipe.compiler.pipeline import build_plan
    from fxpipe.runtime.dist_model import DistributedCompiledModel

    model = make_model(cfg)
    x, t = data(cfg)
    comp = build_plan(model, ["cpu"] * cfg.ranks, (x,), microbatches=cfg.microbatches, schedule="1f1b")
    units = list(comp.plan.costs.unit_names)
    cm = DistributedCompiledModel(model, comp, timeout=600, threads=1)  # as torch's ranks

    # where a rank's step goes: seconds per instruction kind (compute, waiting on receives, sends)
    spent: dict[str, float] = {}
    rt = cm._rt
    for name in ("forward", "backward", "recv_act", "recv_grad", "send_act", "send_grad", "_finish_sends"):
        fn = getattr(rt, name)

        def timed_fn(*a, _fn=fn, _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_name] = spent.get(_name, 0.0) + time.perf_counter() - t0

        setattr(rt, name, timed_fn)
    bcast = cm._broadcast_loss

    def broadcast(*a, **k):  # the last rank waits here for the others' last backward
        t0 = time.perf_counter()
        try:
            return bcast(*a, **k)
        finally:
            spent["loss_broadcast"] = spent.get("loss_broadcast", 0.0) + time.perf_counter() - t0

    cm._broadcast_loss = broadcast
    threads: dict[str, int] = {}
    fwd = rt.forward

    def forward(*a, **k):  # the intra-op threads this rank really computes with
        threads["intra_op"] = torch.get_num_threads()
        threads["interop"] = torch.get_num_interop_threads()
        threads["process_threads"] = len(os.listdir("/proc/self/task")) if os.path.isdir("/proc/self/task") else -1
        return fwd(*a, **k)

    rt.forward = forward
    breakdown: list[dict[str, float]] = []

    def step():
        cm.zero_grad()
        spent.clear()
        r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
        loss = cm.step(x, target=t, loss_fn=F.mse_loss)
        wall, cpu, r1 = time.perf_counter() - t0, time.process_time() - c0, resource.getrusage(resource.RUSAGE_SELF)
        b = {k: round(v, 4) for k, v in spent.items()}
        b["recv_wait"] = round(spent.get("recv_act", 0.0) + spent.get("recv_grad", 0.0), 4)
        b["send"] = round(spent.get("send_act", 0.0) + spent.get("send_grad", 0.0) + spent.get("_finish_sends", 0.0), 4)
        b["other"] = round(wall - sum(v for k, v in spent.items() if k != "recv_wait"), 4)
        b.update(step=round(wall, 4), cpu=round(cpu, 4), minflt=r1.ru_minflt - r0.ru_minflt, **threads)
        breakdown.append(b)
        return loss

    return step, {"breakdown": breakdown, "bounds": [list(s.units) for s in comp.plan.stages],
                  "stage_units": [[units[u] for u in range(*s.units)] for s in comp.plan.stages]}


def torch_runner(cfg: Config, rank: int) -> tuple[Callable[[], Any], dict]:
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B

    model = make_model(cfg)
    x, t = data(cfg)
    per_stage = cfg.blocks // cfg.ranks
    sub = nn.Sequential(*list(model)[rank * per_stage:(rank + 1) * per_stage])
    del model
    stage = PipelineStage(sub, rank, cfg.ranks, torch.device("cpu"))  # shapes inferred on the first step
    sched = Schedule1F1B(stage, cfg.microbatches, loss_fn=F.mse_loss)
    last = cfg.ranks - 1

    def step():
        sub.zero_grad()
        if rank == 0:
            sched.step(x)
            return None
        if rank == last:
            losses: list = []
            sched.step(target=t, losses=losses)
            return sum(l.detach() for l in losses) / len(losses)
        sched.step()
        return None

    return step, {}


def floor_runner(cfg: Config, rank: int, whole_batch: bool = False) -> Callable[[], Any]:
    """This rank's blocks, forward+backward over the microbatches with no pipeline.

    Stage 0 gets the model input (no input gradient), a later stage an input that requires
    grad and, unless last, a fixed output gradient: the compute a pipeline rank does, minus
    the messages and the waiting. `whole_batch`: one microbatch of the whole batch instead.
    """
    model = make_model(cfg)
    x, t = data(cfg)
    per_stage = cfg.blocks // cfg.ranks
    sub = nn.Sequential(*list(model)[rank * per_stage:(rank + 1) * per_stage])
    del model
    m = 1 if whole_batch else cfg.microbatches
    g = torch.Generator().manual_seed(2 + rank)
    xs = [c.contiguous() for c in torch.tensor_split(x if rank == 0 else torch.randn(x.shape, generator=g), m)]
    ts = [c.contiguous() for c in torch.tensor_split(t, m)]
    gs = [c.contiguous() for c in torch.tensor_split(torch.randn(x.shape, generator=g), m)]
    first, last = rank == 0, rank == cfg.ranks - 1

    def step():
        sub.zero_grad()
        for i in range(m):
            inp = xs[i] if first else xs[i].detach().requires_grad_(True)
            out = sub(inp)
            if last:
                (F.mse_loss(out, ts[i]) * (len(ts[i]) / cfg.batch)).backward()
            else:
                out.backward(gs[i])
        return None

    return step


def timed(step: Callable[[], Any], log: dict | None = None) -> tuple[float, Any]:
    """Barrier to barrier wall time of `step` on this rank; with `log`, also this process's CPU
    seconds (every thread) and minor page faults during the step."""
    dist.barrier()
    r0, c0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.process_time(), time.perf_counter()
    out = step()
    dist.barrier()
    dt = time.perf_counter() - t0
    if log is not None:
        log.setdefault("cpu", []).append(time.process_time() - c0)
        log.setdefault("minflt", []).append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - r0.ru_minflt)
    return dt, out


def worker(rank: int, cfg: Config, port: int, out: str, keep_memory: bool) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(cfg.ranks))
    if keep_memory:  # process-wide: every runner of this process gets it alike
        from fxpipe.runtime.distributed import keep_freed_memory

        assert keep_freed_memory(), "glibc's mallopt refused"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cfg.ranks, timeout=datetime.timedelta(seconds=600))
    fx_step, fx_info = fxpipe_runner(cfg, rank)
    tp_step, _ = torch_runner(cfg, rank)
    floor_step, whole_step = floor_runner(cfg, rank), floor_runner(cfg, rank, whole_batch=True)
    # alternate them all, so that whatever else the machine does slows each alike
    res: dict[str, Any] = {"fxpipe": {"times": [], **fx_info}, "torch": {"times": []}, "floor_both": {"times": []},
                           "floor_alone": {"times": []}, "whole_batch_alone": {"times": []}}
    for i in range(cfg.warmup + cfg.steps):
        for name, step in (("fxpipe", fx_step), ("torch", tp_step), ("floor_both", floor_step)):
            dt, loss = timed(step, res[name] if i >= cfg.warmup else None)
            if i >= cfg.warmup:
                res[name]["times"].append(dt)
            res[name]["loss"] = None if loss is None else float(loss)
        for name, step in (("floor_alone", floor_step), ("whole_batch_alone", whole_step)):
            for r in range(cfg.ranks):  # one rank computes, the others wait at the barrier
                dist.barrier()
                if r == rank:
                    c0, t0 = time.process_time(), time.perf_counter()
                    step()
                    if i >= cfg.warmup:
                        res[name]["times"].append(time.perf_counter() - t0)
                        res[name].setdefault("cpu", []).append(time.process_time() - c0)
                dist.barrier()
    Path(out.format(rank=rank)).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def single_process(cfg: Config, keep_memory: bool) -> float:
    """The whole model's step, whole batch, one thread, in a fresh process (as the ranks)."""
    if keep_memory:
        from fxpipe.runtime.distributed import keep_freed_memory

        keep_freed_memory()
    torch.set_num_threads(1)
    model = make_model(cfg)
    x, t = data(cfg)
    times = []
    for i in range(cfg.warmup + cfg.steps):
        model.zero_grad()
        t0 = time.perf_counter()
        F.mse_loss(model(x), t).backward()
        if i >= cfg.warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _single_worker(rank: int, cfg: Config, keep_memory: bool, out: str) -> None:
    Path(out).write_text(json.dumps(single_process(cfg, keep_memory)))


def measure(cfg: Config, keep_memory: bool) -> dict:
    """One spawned world: every runner's steps alternating; the aggregated figures."""
    import tempfile

    import torch.multiprocessing as mp

    load_before = os.getloadavg()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank{rank}.json")
        mp.start_processes(worker, args=(cfg, port, out, keep_memory), nprocs=cfg.ranks, join=True,
                           start_method="spawn")
        ranks = [json.loads(Path(out.format(rank=r)).read_text()) for r in range(cfg.ranks)]
        single_out = os.path.join(tmp, "single.json")
        mp.start_processes(_single_worker, args=(cfg, keep_memory, single_out), nprocs=1, join=True,
                           start_method="spawn")
        single = json.loads(Path(single_out).read_text())
    per_stage = cfg.blocks // cfg.ranks
    for i, names in enumerate(ranks[0]["fxpipe"]["stage_units"]):  # the same split as torch's
        blocks = sorted({int(n.split(".")[0]) for n in names})
        assert blocks == list(range(i * per_stage, (i + 1) * per_stage)), f"fxpipe stage {i} has blocks {blocks}"
    med = statistics.median
    # a step ends when its last rank ends: per step, the slowest rank's time
    fx = [max(r["fxpipe"]["times"][i] for r in ranks) for i in range(cfg.steps)]
    tp = [max(r["torch"]["times"][i] for r in ranks) for i in range(cfg.steps)]
    both = [max(r["floor_both"]["times"][i] for r in ranks) for i in range(cfg.steps)]
    fx_med, tp_med = med(fx), med(tp)
    p, m = cfg.ranks, cfg.microbatches
    bubble = 1 + (p - 1) / m  # 1F1B: (p-1) microbatch slots idle per rank besides m busy ones
    alone = [med(r["floor_alone"]["times"]) for r in ranks]
    floor = {
        "alone_per_rank_s": alone,
        "both_ranks_at_once_per_rank_s": [med(r["floor_both"]["times"]) for r in ranks],
        "both_ranks_at_once_s": med(both),
        "whole_batch_alone_per_rank_s": [med(r["whole_batch_alone"]["times"]) for r in ranks],
    }
    ideal = {
        "issue_single_over_p_with_bubble_s": single / p * bubble,
        "floor_alone_with_bubble_s": max(alone) * bubble,
        "floor_both_at_once_with_bubble_s": med(both) * bubble,
        # CPU seconds are what the rank itself computed, whatever else took the cores meanwhile
        "floor_alone_cpu_with_bubble_s": max(med(r["floor_alone"]["cpu"]) for r in ranks) * bubble,
    }

    def rank_row(r: dict) -> dict:
        steps = r["fxpipe"]["breakdown"][cfg.warmup:]
        keys = [k for k in steps[0] if isinstance(steps[0][k], (int, float))]
        return {k: med(b.get(k, 0.0) for b in steps) for k in keys}

    return {
        "keep_freed_memory": keep_memory,
        "fxpipe_step_s": fx_med, "torch_pipelining_step_s": tp_med, "ratio_fxpipe_over_torch": fx_med / tp_med,
        "single_process_1thread_step_s": single, "fxpipe_steps_s": fx, "torch_steps_s": tp,
        "compute_floor": floor, "ideal_step_s": ideal,
        "fxpipe_over_floor_both_with_bubble": fx_med / ideal["floor_both_at_once_with_bubble_s"],
        "torch_over_floor_both_with_bubble": tp_med / ideal["floor_both_at_once_with_bubble_s"],
        "cpu_s_per_step_per_rank": {n: [med(r[n]["cpu"]) for r in ranks]
                                    for n in ("fxpipe", "torch", "floor_both", "floor_alone", "whole_batch_alone")},
        "minor_faults_per_step_per_rank": {n: [med(r[n]["minflt"]) for r in ranks]
                                           for n in ("fxpipe", "torch", "floor_both")},
        "fxpipe_bounds": ranks[0]["fxpipe"]["bounds"], "fxpipe_stage_units": ranks[0]["fxpipe"]["stage_units"],
        "fxpipe_loss": ranks[-1]["fxpipe"]["loss"], "torch_loss": ranks[-1]["torch"]["loss"],
        "fxpipe_breakdown_per_rank_s": [rank_row(r) for r in ranks],
        "load_average_before": load_before, "load_average_after": os.getloadavg(),
    }


def markdown(cfg: Config, runs: list[dict], command: str) -> list[str]:
    """The results page: one section per malloc setting."""
    p, m = cfg.ranks, cfg.microbatches
    fl = lambda xs: " / ".join(f"{v:.3f}" for v in xs)  # noqa: E731
    md = [
        "# fxpipe distributed runtime vs torch.distributed.pipelining (gloo, CPU)",
        "",
        f"{cfg.blocks} blocks of Linear({cfg.hidden},{cfg.ffn})-GELU-Linear({cfg.ffn},{cfg.hidden}), batch {cfg.batch}, "
        f"{m} microbatches, 1F1B, {p} ranks (gloo), {cfg.blocks // p} blocks per stage, "
        f"1 intra-op thread per rank, {os.cpu_count()} cores, torch {torch.__version__}. Median of {cfg.steps} steps "
        f"after {cfg.warmup} warm-up, all runners' steps alternating in the same two processes; a step is timed "
        "barrier to barrier. The compute floor is each rank's own blocks run fwd+bwd over the same microbatches "
        "with no pipeline (no messages, no waiting): 'both at once' is what 2 ranks on these 2 cores can reach; "
        "the ideal step is a floor x (1 + (p-1)/m), the 1F1B bubble. Other jobs share the machine (load averages "
        "below): the CPU seconds per step are less sensitive to them than the wall times.",
    ]
    for res in runs:
        fx_med, tp_med, floor, ideal = (res["fxpipe_step_s"], res["torch_pipelining_step_s"], res["compute_floor"],
                                        res["ideal_step_s"])
        md += [
            "",
            f"## malloc: {'keep_freed_memory() in every process' if res['keep_freed_memory'] else 'glibc defaults'}",
            "",
            f"Load average before: {', '.join(f'{v:.1f}' for v in res['load_average_before'])}; after: "
            f"{', '.join(f'{v:.1f}' for v in res['load_average_after'])}.",
            "",
            "| runner | step (s) |",
            "|---|---|",
            f"| torch.distributed.pipelining (PipelineStage + Schedule1F1B) | {tp_med:.3f} |",
            f"| fxpipe DistributedCompiledModel | {fx_med:.3f} |",
            f"| compute floor, both ranks at once ({m} x {cfg.batch // m} rows fwd+bwd per rank, no pipeline) "
            f"| {floor['both_ranks_at_once_s']:.3f} |",
            f"| one process, one thread, whole model, whole batch (reference) | {res['single_process_1thread_step_s']:.3f} |",
            "",
            f"fxpipe / torch.distributed.pipelining = **{res['ratio_fxpipe_over_torch']:.2f}x**.",
            "",
            "| ideal step from | s |",
            "|---|---|",
            f"| the issue's: whole model single / {p} | {ideal['issue_single_over_p_with_bubble_s']:.3f} |",
            f"| compute floor, one rank at a time (slowest rank) | {ideal['floor_alone_with_bubble_s']:.3f} |",
            f"| compute floor, both ranks at once | {ideal['floor_both_at_once_with_bubble_s']:.3f} |",
            f"| compute floor's CPU seconds, one rank at a time (slowest rank) | "
            f"{ideal['floor_alone_cpu_with_bubble_s']:.3f} |",
            "",
            f"Compute floor per rank (rank 0 / rank 1, s): alone {fl(floor['alone_per_rank_s'])}; both at once "
            f"{fl(floor['both_ranks_at_once_per_rank_s'])}; the same blocks on one {cfg.batch}-row microbatch, alone "
            f"{fl(floor['whole_batch_alone_per_rank_s'])}. "
            f"fxpipe / ideal (both at once) = {res['fxpipe_over_floor_both_with_bubble']:.2f}; "
            f"torch / same = {res['torch_over_floor_both_with_bubble']:.2f}.",
            "",
            "Where an fxpipe step goes, per rank (median over steps, s; recv wait = blocked on the peer's message; "
            "loss bcast = the last rank waiting for the others' last backward; other = the runtime's Python around "
            "the instructions; cpu = the process's CPU time over the step, all threads):",
            "",
            "| rank | step | forward | backward | recv wait | send | loss bcast | other | cpu | minor faults "
            "| intra-op threads |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
            *[f"| {r} | {b.get('step', 0):.3f} | {b.get('forward', 0):.3f} | {b.get('backward', 0):.3f} | "
              f"{b.get('recv_wait', 0):.3f} | {b.get('send', 0):.3f} | {b.get('loss_broadcast', 0):.3f} | "
              f"{b.get('other', 0):.3f} | {b.get('cpu', 0):.3f} | {b.get('minflt', 0):.0f} | {b.get('intra_op', 0):.0f} |"
              for r, b in enumerate(res["fxpipe_breakdown_per_rank_s"])],
            "",
            "CPU s per step per rank (rank 0 / rank 1): " + "; ".join(
                f"{n} {fl(v)}" for n, v in res["cpu_s_per_step_per_rank"].items()) + ". Minor page faults per step: "
            + "; ".join(f"{n} {' / '.join(f'{v:.0f}' for v in vs)}"
                        for n, vs in res["minor_faults_per_step_per_rank"].items()) + ".",
        ]
    md += ["", f"Command: `{command}`"]
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--malloc", choices=["default", "keep", "both"], default="both",
                    help="glibc defaults, keep_freed_memory() in every process, or one world of each")
    ap.add_argument("--name", default="vs_torch_pipelining", help="results file name (without extension)")
    args = ap.parse_args()
    cfg = Config(blocks=4, hidden=128, ffn=512, batch=64) if args.quick else Config()
    cfg.steps = args.steps
    from fxpipe.compiler.cluster import cpu_calibration

    cpu_calibration()  # cached before the ranks plan, so both plan alike
    keeps = {"default": [False], "keep": [True], "both": [False, True]}[args.malloc]
    runs = [measure(cfg, k) for k in keeps]
    result = {"config": asdict(cfg), "machine": {"cpus": os.cpu_count(), "torch": torch.__version__}, "runs": runs}
    print(json.dumps(result, indent=2))
    if args.quick:
        return
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    extra = "".join(f" --{k} {v}" for k, v, d in (("steps", args.steps, 5), ("malloc", args.malloc, "both"),
                                                   ("name", args.name, "vs_torch_pipelining")) if v != d)
    command = f"python3 benchmarks/vs_torch_pipelining.py{extra}"
    (res_dir / f"{args.name}.md").write_text("\n".join(markdown(cfg, runs, command)) + "\n")


if __name__ == "__main__":
    main()
