"""Offload streaming (issue 6, capability 3): throughput with streamed weights vs resident ones.

One question: on one GPU, how close does a stage whose weights live in pinned host memory
(streamed unit by unit, `fxpipe.compile(..., offload="on")`, runtime/offload.py) come to the
same stage with all weights resident, as the tokens per microbatch grow? Streaming moves every
weight host->device twice per step (forward and backward) and every weight gradient back, so
it hides behind compute only when a unit's compute outlasts its copies; the crossover is the
smallest token count where offloaded/resident throughput >= 0.8.

Model: `layers` x (Linear(hidden, hidden) + GELU, or ReLU with --act relu), one stage, one
microbatch, MSE loss; the step is `cm.step` (forward + backward, gradients final on the
parameters; no optimizer step). Times: median of `steps` steps after `warmup`, host
perf_counter around a synchronised step. Peak device memory: `torch.cuda.max_memory_allocated`
over the timed steps. The "cap" is the weights' bytes / 2.5 (the issue's setting: weights 2.5x
the memory cap); the table says whether the offloaded run's peak stayed under it (activations
count too: at large token counts they alone exceed it, which the table shows rather than
hides). The resident run is the reference and is not capped. Also measured: host->device
bandwidth of one unit's weight from pinned memory, and the lower bound it implies for a step's
transfers.

Every row also asks the planner (on the meta device, so it needs no GPU) about the same GPU
capped at weights / 2.5 (offload="auto", Adam, the measured host link or --host-gbs): does it
stream, does the plan fit, what step does it predict. The timed offloaded model is the same
single streamed stage, so predicted and measured stand side by side.

    PYTHONPATH=. python3 benchmarks/offload.py                          # GPU: writes results/offload_fp32.{json,md}
    PYTHONPATH=. python3 benchmarks/offload.py --dtype bf16 --layers 16
    PYTHONPATH=. python3 benchmarks/offload.py --hidden 4096 --layers 48 --tokens 512,1024,2048
    # compute-bound under the cap: 24 GiB of weights on a 9.6 GiB GPU; with ReLU a layer keeps
    # one activation, so 2048 tokens fit (planned here: 8.13 of 9.60 GiB)
    PYTHONPATH=. python3 benchmarks/offload.py --hidden 16384 --layers 24 --act relu --tokens 512,1024,2048
    PYTHONPATH=. python3 benchmarks/offload.py --hidden 16384 --layers 24 --act relu --plan-only --tokens 512,2048,3072
    PYTHONPATH=. python3 benchmarks/offload.py --cpu --out /tmp/offload_smoke   # tiny CPU smoke run
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import fxpipe
from fxpipe.runtime import offload as offload_mod

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class Config:
    hidden: int = 8192
    layers: int = 12
    act: str = "gelu"
    dtype: str = "fp32"
    tokens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    steps: int = 5
    warmup: int = 2
    cap_factor: float = 2.5
    cpu: bool = False
    plan_only: bool = False
    host_gbs: float = 55.0  # host link the planner assumes where none is measured (plan-only runs)


def make_model(cfg: Config, device: str | torch.device = "cpu") -> nn.Sequential:
    """`layers` x (Linear + activation), built directly on `device` (meta for planning only).
    With ReLU, autograd's saved output of the activation is the next Linear's saved input (one
    tensor), so a layer keeps one activation instead of GELU's two."""
    layers: list[nn.Module] = []
    torch.manual_seed(0)
    with torch.device(device):
        for _ in range(cfg.layers):
            layers += [nn.Linear(cfg.hidden, cfg.hidden, dtype=DTYPES[cfg.dtype]),
                       nn.GELU() if cfg.act == "gelu" else nn.ReLU()]
    return nn.Sequential(*layers)


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _time_steps(cm, x: torch.Tensor, y: torch.Tensor, cfg: Config, dev: torch.device) -> tuple[float, float | None]:
    """Median step seconds and peak allocated bytes over the timed steps."""
    for _ in range(cfg.warmup):
        cm.step(x, target=y, loss_fn=F.mse_loss)
    _sync(dev)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    ts = []
    for _ in range(cfg.steps):
        for p in cm.parameters():
            p.grad = None  # each step from fresh gradients, like an optimizer loop with zero_grad
        _sync(dev)
        t0 = time.perf_counter()
        cm.step(x, target=y, loss_fn=F.mse_loss)
        _sync(dev)
        ts.append(time.perf_counter() - t0)
    peak = float(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None
    return statistics.median(ts), peak


def _h2d_bandwidth(cfg: Config, dev: torch.device) -> float | None:
    """Bytes/s of one layer's weight from pinned host memory to the device (median of 5)."""
    if dev.type != "cuda":
        return None
    w = torch.empty(cfg.hidden, cfg.hidden, dtype=DTYPES[cfg.dtype]).pin_memory()
    d = torch.empty_like(w, device=dev)
    ts = []
    for _ in range(6):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        d.copy_(w, non_blocking=True)
        e.record()
        torch.cuda.synchronize(dev)
        ts.append(s.elapsed_time(e) / 1e3)
    return w.numel() * w.element_size() / statistics.median(ts[1:])


def _compiled(cfg: Config, dev: torch.device, offload: str, tokens: int):
    # resident: built on the device (fast init, no host copy); offloaded: built on the host,
    # where its weights stay
    model = make_model(cfg, dev if offload == "off" else "cpu")
    x = torch.randn(tokens, cfg.hidden, dtype=DTYPES[cfg.dtype], device=dev)
    # optimizer="none": the benchmark times forward + backward only, so the plan must not
    # reserve optimizer state (with Adam's, a resident 24 x Linear(16384) would not fit an H100)
    cm = fxpipe.compile(model, [str(dev)], example_inputs=(x,), microbatches=1, schedule="gpipe", offload=offload,
                        optimizer="none")
    want = offload == "on"
    got = [bool(getattr(s, "offload", False)) for s in cm.plan.stages]
    if got != [want]:
        raise SystemExit(f"the plan's stages have offload={got}, expected [{want}]")
    return cm


def capped_device(cap: float, host_bandwidth: float, gpu_name: str = "h100"):
    """The GPU the planner is asked about: the H100 (or H200) preset with `memory=cap`."""
    from fxpipe.compiler.cluster import CUDA_PRESETS, Device

    preset = CUDA_PRESETS["h200" if "h200" in gpu_name.lower() else "h100"]
    return Device("cuda:0", "cuda", preset["peak_flops"], preset["mem_bandwidth"], memory=cap,
                  host_bandwidth=host_bandwidth)


def planner_decision(cfg: Config, tokens: int, cap: float, host_bandwidth: float, gpu_name: str = "h100") -> dict:
    """What the planner decides for the model on a GPU capped at `cap` bytes (offload="auto",
    Adam, as a training job would plan it; the offloaded stage keeps its state on the host):
    whether it streams, its planned device bytes and predicted step. Planned on the meta device,
    so it runs anywhere and allocates nothing."""
    from fxpipe.errors import PlanError

    model = make_model(cfg, "meta")
    x = torch.empty(tokens, cfg.hidden, dtype=DTYPES[cfg.dtype], device="meta")
    try:
        plan = fxpipe.plan(model, [capped_device(cap, host_bandwidth, gpu_name)], example_inputs=(x,),
                           microbatches=1, schedule="gpipe", offload="auto")
    except PlanError as e:
        # the line naming the stage's need against the cap says most; else the first line
        lines = str(e).splitlines()
        need = next((ln.strip() for ln in lines if " needs " in ln and " short" in ln), lines[0])
        return dict(planner_offloads=False, why="does not fit: " + need)
    stage = plan.stages[0]
    if not stage.offload:
        return dict(planner_offloads=False, why="the planner kept the weights resident")
    return dict(planner_offloads=True, planned_gib=stage.memory_bytes / 2**30,
                predicted_ms=plan.predicted["step_ms"])


def run(cfg: Config) -> dict:
    dev = torch.device("cpu") if cfg.cpu or cfg.plan_only else torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[cfg.dtype]
    weights = cfg.layers * (cfg.hidden * cfg.hidden + cfg.hidden) * torch.finfo(dtype).bits // 8
    cap = weights / cfg.cap_factor
    bw = None if cfg.plan_only else _h2d_bandwidth(cfg, dev)
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "h100"
    # the planner on a GPU capped at weights / cap_factor, per token count: does it stream, does
    # the plan fit, what does it predict (the measured host link where there is one)
    planned = {t: planner_decision(cfg, t, cap, bw or cfg.host_gbs * 1e9, gpu) for t in cfg.tokens}
    results: dict[str, dict[int, tuple[float, float | None]]] = {}
    for mode in ([] if cfg.plan_only else ["off", "on"]):
        # one compiled model per mode for every token count: the offloaded one has the same
        # single streamed stage the capped planner chooses where it streams
        cm = _compiled(cfg, dev, mode, cfg.tokens[0])
        results[mode] = {}
        for t in cfg.tokens:
            torch.manual_seed(1)
            x = torch.randn(t, cfg.hidden, dtype=dtype, device=dev)
            y = torch.randn(t, cfg.hidden, dtype=dtype, device=dev)
            try:
                results[mode][t] = _time_steps(cm, x, y, cfg, dev)
            except torch.OutOfMemoryError:
                results[mode][t] = (float("nan"), None)
            print(f"  offload={mode} tokens={t}: {results[mode][t][0] * 1e3:.1f} ms", file=sys.stderr, flush=True)
            del x, y
        del cm
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    rows = []
    crossover = None
    for t in cfg.tokens:
        row = dict(tokens=t, **planned[t])
        if not cfg.plan_only:
            (tr, pr), (to, po) = results["off"][t], results["on"][t]
            ratio = tr / to if to == to and tr == tr else float("nan")  # throughput ratio: offloaded / resident
            # the transfers a step needs at least: weights in twice (forward, backward) and gradients out
            # once; the link is full duplex, so the gradients cross while the backward's weights come in
            transfer_s = 2 * weights / bw if bw else None
            row.update(resident_ms=tr * 1e3, offloaded_ms=to * 1e3, ratio=ratio,
                       resident_tok_s=t / tr, offloaded_tok_s=t / to,
                       resident_peak_gib=pr / 2**30 if pr is not None else None,
                       offloaded_peak_gib=po / 2**30 if po is not None else None,
                       offloaded_fits_cap=(po <= cap) if po is not None else None,
                       transfer_bound_ms=transfer_s * 1e3 if transfer_s else None)
            # the crossover: from here on (every larger token count in the sweep) the ratio stays >= 0.8
            if ratio >= 0.8:
                crossover = t if crossover is None else crossover
            else:
                crossover = None
        rows.append(row)
    return dict(config=dataclasses.asdict(cfg), device=gpu if dev.type == "cuda" else "cpu",
                torch=torch.__version__, weights_gib=weights / 2**30, cap_gib=cap / 2**30,
                h2d_gb_s=bw / 1e9 if bw else None, min_unit_bytes=offload_mod.DEFAULT_MIN_UNIT_BYTES,
                rows=rows, crossover_tokens=crossover)


def markdown(res: dict, command: str) -> str:
    c = res["config"]
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    act = {"gelu": "GELU", "relu": "ReLU"}[c["act"]]
    lines = [f"# Offload streaming: {c['layers']} x Linear({c['hidden']})+{act}, {c['dtype']}, {res['device']}", "",
             f"`{command}`", "",
             f"weights {res['weights_gib']:.2f} GiB, cap (weights / {c['cap_factor']}) {res['cap_gib']:.2f} GiB, "
             f"host->device {f(res['h2d_gb_s'], '.1f')} GB/s (pinned, one layer's weight); "
             f"median of {c['steps']} steps after {c['warmup']} warm-up; step = forward + backward.", ""]
    if not c["plan_only"]:
        lines += ["| tokens | resident ms | offloaded ms | offloaded/resident throughput | resident peak GiB | "
                  "offloaded peak GiB | under cap | transfer bound ms |",
                  "|---:|---:|---:|---:|---:|---:|:---:|---:|"]
        for r in res["rows"]:
            fits = "-" if r["offloaded_fits_cap"] is None else ("yes" if r["offloaded_fits_cap"] else "no")
            lines.append(f"| {r['tokens']} | {r['resident_ms']:.1f} | {r['offloaded_ms']:.1f} | {r['ratio']:.2f} | "
                         f"{f(r['resident_peak_gib'], '.2f')} | {f(r['offloaded_peak_gib'], '.2f')} | {fits} | "
                         f"{f(r['transfer_bound_ms'], '.1f')} |")
        x = res["crossover_tokens"]
        lines += ["", f"crossover (ratio >= 0.8): {'none in the sweep' if x is None else f'{x} tokens per microbatch'}",
                  ""]
    link = f"{res['h2d_gb_s']:.1f} GB/s measured" if res["h2d_gb_s"] else f"{c['host_gbs']:.0f} GB/s assumed"
    lines += [f"The planner on the GPU capped at {res['cap_gib']:.2f} GiB (offload='auto', Adam, host link {link}; "
              "planned on the meta device). Where it streams, the offloaded column above is that same single "
              "streamed stage:", "",
              "| tokens | planner streams | planned GiB | measured peak GiB | predicted ms | measured ms | note |",
              "|---:|:---:|---:|---:|---:|---:|---|"]
    for r in res["rows"]:
        if r["planner_offloads"]:
            lines.append(f"| {r['tokens']} | yes | {r['planned_gib']:.2f} | {f(r.get('offloaded_peak_gib'), '.2f')} | "
                         f"{r['predicted_ms']:.1f} | {f(r.get('offloaded_ms'), '.1f')} | |")
        else:
            lines.append(f"| {r['tokens']} | no | - | - | - | - | {r['why']} |")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--act", choices=("gelu", "relu"), default="gelu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--tokens", type=lambda s: tuple(int(v) for v in s.split(",")), help="comma-separated sweep")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: checks the script end to end")
    ap.add_argument("--plan-only", action="store_true",
                    help="only the planner's decisions under the cap (meta device, runs anywhere, times nothing)")
    ap.add_argument("--host-gbs", type=float, default=55.0, help="host link (GB/s) the planner assumes when not measured")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    cfg = Config(act=args.act, dtype=args.dtype, steps=args.steps, warmup=args.warmup, cpu=args.cpu,
                 plan_only=args.plan_only, host_gbs=args.host_gbs)
    if args.cpu:
        cfg = dataclasses.replace(cfg, hidden=64, layers=4, tokens=(32, 128), steps=3, warmup=1)
        offload_mod.DEFAULT_MIN_UNIT_BYTES = 0  # one unit per layer even at these sizes
    elif not torch.cuda.is_available() and not args.plan_only:
        raise SystemExit("no CUDA device: run on the GPU machine, or pass --cpu for the smoke run")
    if args.hidden:
        cfg.hidden = args.hidden
    if args.layers:
        cfg.layers = args.layers
    if args.tokens:
        cfg.tokens = args.tokens
    command = "PYTHONPATH=. python3 " + " ".join(["benchmarks/offload.py", *(argv if argv is not None else sys.argv[1:])])
    print(command)
    res = run(cfg)
    res["command"] = command
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = ("offload_cpu_smoke" if cfg.cpu else f"offload_{cfg.dtype}"
            + ("" if cfg.act == "gelu" else f"_{cfg.act}") + ("_plan" if cfg.plan_only else "")
            + ("" if (cfg.hidden, cfg.layers) == (8192, 12) else f"_{cfg.layers}x{cfg.hidden}"))
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = markdown(res, command)
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
