"""fxpipe's distributed runtime against torch.distributed.pipelining, same model, split and schedule.

8 blocks of Linear(1024,4096)-GELU-Linear(4096,1024), batch 256, 8 microbatches, 1F1B,
2 ranks on gloo/CPU, 4 blocks per stage, one intra-op thread per rank (this machine has 2
cores). fxpipe plans the model itself (the plan's cut is checked to be the same 4/4 split);
torch.distributed.pipelining gets each rank's 4 blocks as its PipelineStage, Schedule1F1B,
MSE loss. Both run in the same two processes, their steps alternating (so that other load
on the machine slows both alike). Each step is timed from a barrier to a barrier; the figure is the median of `steps` steps after `warmup` steps. For
reference, the whole model's step in one single-threaded process is timed too (the ideal
2-stage pipeline takes about half of it plus the bubble).

    python3 benchmarks/vs_torch_pipelining.py           # writes benchmarks/results/vs_torch_pipelining.{json,md}
    python3 benchmarks/vs_torch_pipelining.py --quick   # smaller model, smoke run (results not written)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
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
    breakdown: list[dict[str, float]] = []

    def step():
        cm.zero_grad()
        spent.clear()
        t0 = time.perf_counter()
        loss = cm.step(x, target=t, loss_fn=F.mse_loss)
        breakdown.append({**{k: round(v, 4) for k, v in spent.items()}, "step": round(time.perf_counter() - t0, 4)})
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


def timed(step: Callable[[], Any]) -> tuple[float, Any]:
    dist.barrier()
    t0 = time.perf_counter()
    out = step()
    dist.barrier()
    return time.perf_counter() - t0, out


def worker(rank: int, cfg: Config, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(cfg.ranks))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=cfg.ranks, timeout=datetime.timedelta(seconds=600))
    fx_step, fx_info = fxpipe_runner(cfg, rank)
    tp_step, _ = torch_runner(cfg, rank)
    # alternate the two, so that whatever else the machine does slows both alike
    res = {"fxpipe": {"times": [], **fx_info}, "torch": {"times": []}}
    for i in range(cfg.warmup + cfg.steps):
        for name, step in (("fxpipe", fx_step), ("torch", tp_step)):
            dt, loss = timed(step)
            if i >= cfg.warmup:
                res[name]["times"].append(dt)
            res[name]["loss"] = None if loss is None else float(loss)
    Path(out.format(rank=rank)).write_text(json.dumps(res))
    dist.barrier()
    dist.destroy_process_group()


def single_process(cfg: Config) -> float:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--name", default="vs_torch_pipelining", help="results file name (without extension)")
    args = ap.parse_args()
    cfg = Config(blocks=4, hidden=128, ffn=512, batch=64) if args.quick else Config()
    cfg.steps = args.steps
    import tempfile

    import torch.multiprocessing as mp

    from fxpipe.compiler.cluster import cpu_calibration

    cpu_calibration()  # cached before the ranks plan, so both plan alike
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rank{rank}.json")
        mp.start_processes(worker, args=(cfg, port, out), nprocs=cfg.ranks, join=True, start_method="spawn")
        ranks = [json.loads(Path(out.format(rank=r)).read_text()) for r in range(cfg.ranks)]
    per_stage = cfg.blocks // cfg.ranks
    for i, names in enumerate(ranks[0]["fxpipe"]["stage_units"]):  # the same split as torch's
        blocks = sorted({int(n.split(".")[0]) for n in names})
        assert blocks == list(range(i * per_stage, (i + 1) * per_stage)), f"fxpipe stage {i} has blocks {blocks}"
    single = single_process(cfg)
    # a step ends when its last rank ends: per step, the slowest rank's time
    fx = [max(r["fxpipe"]["times"][i] for r in ranks) for i in range(cfg.steps)]
    tp = [max(r["torch"]["times"][i] for r in ranks) for i in range(cfg.steps)]
    fx_med, tp_med = statistics.median(fx), statistics.median(tp)
    result = {
        "config": asdict(cfg), "machine": {"cpus": os.cpu_count(), "torch": torch.__version__},
        "fxpipe_step_s": fx_med, "torch_pipelining_step_s": tp_med, "ratio_fxpipe_over_torch": fx_med / tp_med,
        "single_process_1thread_step_s": single, "fxpipe_steps_s": fx, "torch_steps_s": tp,
        "fxpipe_bounds": ranks[0]["fxpipe"]["bounds"], "fxpipe_stage_units": ranks[0]["fxpipe"]["stage_units"], "fxpipe_loss": ranks[-1]["fxpipe"]["loss"],
        "torch_loss": ranks[-1]["torch"]["loss"],
        "fxpipe_breakdown_per_rank_s": [r["fxpipe"]["breakdown"][-1] for r in ranks], "load_average_after": os.getloadavg(),
    }
    print(json.dumps(result, indent=2))
    if args.quick:
        return
    res_dir = ROOT / "benchmarks" / "results"
    res_dir.mkdir(parents=True, exist_ok=True)
    (res_dir / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "# fxpipe distributed runtime vs torch.distributed.pipelining (gloo, CPU)",
        "",
        f"{cfg.blocks} blocks of Linear({cfg.hidden},{cfg.ffn})-GELU-Linear({cfg.ffn},{cfg.hidden}), batch {cfg.batch}, "
        f"{cfg.microbatches} microbatches, 1F1B, {cfg.ranks} ranks (gloo), {cfg.blocks // cfg.ranks} blocks per stage, "
        f"1 intra-op thread per rank, {os.cpu_count()} cores, torch {torch.__version__}. Median of {cfg.steps} steps "
        f"after {cfg.warmup} warm-up, the two runners' steps alternating; a step is timed barrier to barrier. "
        f"Load average after the run: {', '.join(f'{l:.1f}' for l in os.getloadavg())} (other jobs share the machine).",
        "",
        "| runner | step (s) |",
        "|---|---|",
        f"| torch.distributed.pipelining (PipelineStage + Schedule1F1B) | {tp_med:.3f} |",
        f"| fxpipe DistributedCompiledModel | {fx_med:.3f} |",
        f"| one process, one thread, whole batch (reference) | {single:.3f} |",
        "",
        f"fxpipe / torch.distributed.pipelining = **{fx_med / tp_med:.2f}x**; "
        f"ideal 2-stage pipeline ~ single / 2 x (1 + bubble (p-1)/m) = {single / 2 * (1 + 1 / cfg.microbatches):.3f} s.",
        "",
        "Where an fxpipe step goes, per rank (last step, seconds; compute = forward + backward, "
        "recv = waiting for the peer's message):",
        "",
        "| rank | step | forward | backward | recv wait | send |",
        "|---|---|---|---|---|---|",
        *[f"| {r} | {b.get('step', 0):.3f} | {b.get('forward', 0):.3f} | {b.get('backward', 0):.3f} | "
          f"{b.get('recv_act', 0) + b.get('recv_grad', 0):.3f} | "
          f"{b.get('send_act', 0) + b.get('send_grad', 0) + b.get('_finish_sends', 0):.3f} |"
          for r, b in enumerate(result["fxpipe_breakdown_per_rank_s"])],
        "",
        f"Command: `python3 benchmarks/vs_torch_pipelining.py{' --name ' + args.name if args.name != 'vs_torch_pipelining' else ''}`",
    ]
    (res_dir / f"{args.name}.md").write_text("\n".join(md) + "\n")


if __name__ == "__main__":
    main()
