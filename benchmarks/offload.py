"""Offload streaming (issue 6, capability 3): throughput with streamed weights vs resident ones.

One question: on one GPU, how close does a stage whose weights live in pinned host memory
(streamed unit by unit, `fxpipe.compile(..., offload="on")`, runtime/offload.py) come to the
same stage with all weights resident, as the tokens per microbatch grow? Streaming moves every
weight host->device twice per step (forward and backward) and every weight gradient back, so
it hides behind compute only when a unit's compute outlasts its copies; the crossover is the
smallest token count where offloaded/resident throughput >= 0.8.

Model: `layers` x (Linear(hidden, hidden) + GELU), one stage, one microbatch, MSE loss; the
step is `cm.step` (forward + backward, gradients final on the parameters; no optimizer step).
Times: median of `steps` steps after `warmup`, host perf_counter around a synchronised step.
Peak device memory: `torch.cuda.max_memory_allocated` over the timed steps. The "cap" is the
weights' bytes / 2.5 (the issue's setting: weights 2.5x the memory cap); the table says
whether the offloaded run's peak stayed under it (activations count too: at large token
counts they alone exceed it, which the table shows rather than hides). The resident run is
the reference and is not capped. Also measured: host->device bandwidth of one unit's weight
from pinned memory, and the lower bound it implies for a step's transfers.

    PYTHONPATH=. python3 benchmarks/offload.py                          # GPU: writes results/offload.{json,md}
    PYTHONPATH=. python3 benchmarks/offload.py --dtype bf16 --layers 16
    PYTHONPATH=. python3 benchmarks/offload.py --hidden 4096 --layers 48 --tokens 512,1024,2048

On a GPU each offloaded row also asks the planner, on the same GPU capped at weights / 2.5
(offload="auto", Adam, the measured host link), whether it streams and whether the plan fits;
where it does, that plan is the one timed, and its predicted step and memory are reported next
to the measured ones. Planned on this CPU (meta model, H100 preset, 55 GB/s): 48 x
Linear(4096) fits the cap at 512 tokens (1.07 of 1.20 GiB, streamed); 12 x Linear(8192) never
does (two 256 MiB layers' weights and gradients already take 1 GiB).
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
    dtype: str = "fp32"
    tokens: tuple[int, ...] = (512, 1024, 2048, 4096, 8192, 16384)
    steps: int = 5
    warmup: int = 2
    cap_factor: float = 2.5
    cpu: bool = False


def make_model(cfg: Config) -> nn.Sequential:
    layers: list[nn.Module] = []
    for _ in range(cfg.layers):
        layers += [nn.Linear(cfg.hidden, cfg.hidden), nn.GELU()]
    torch.manual_seed(0)
    return nn.Sequential(*layers).to(DTYPES[cfg.dtype])


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
    model = make_model(cfg)
    if offload == "off":
        model = model.to(dev)
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


def _capped(cfg: Config, dev: torch.device, tokens: int, cap: float, bw: float | None):
    """The planner's own decision on a device whose memory is the cap: (compiled model or
    None, why not). The device is the real GPU with `memory=cap` and the measured host link."""
    from fxpipe.compiler.cluster import CUDA_PRESETS, Device
    from fxpipe.errors import PlanError

    name = torch.cuda.get_device_name(dev).lower()
    preset = CUDA_PRESETS["h200" if "h200" in name else "h100"]
    d = Device(str(dev), "cuda", preset["peak_flops"], preset["mem_bandwidth"], memory=cap,
               host_bandwidth=bw or 50e9)
    model = make_model(cfg)
    x = torch.randn(tokens, cfg.hidden, dtype=DTYPES[cfg.dtype], device=dev)
    try:  # Adam, as a training job would plan it: the offloaded stage keeps its state on the host
        cm = fxpipe.compile(model, [d], example_inputs=(x,), microbatches=1, schedule="gpipe", offload="auto")
    except PlanError as e:
        return None, str(e).splitlines()[0]
    if not cm.plan.stages[0].offload:
        return None, "the planner kept the weights resident"
    return cm, ""


def run(cfg: Config) -> dict:
    dev = torch.device("cpu") if cfg.cpu else torch.device("cuda", torch.cuda.current_device())
    dtype = DTYPES[cfg.dtype]
    weights = cfg.layers * (cfg.hidden * cfg.hidden + cfg.hidden) * torch.finfo(dtype).bits // 8
    cap = weights / cfg.cap_factor
    bw = _h2d_bandwidth(cfg, dev)
    rows = []
    results: dict[str, dict[int, tuple[float, float | None]]] = {}
    planned: dict[int, dict] = {}  # per token count: what the planner decided under the cap
    for mode in ("off", "on"):
        cm = _compiled(cfg, dev, mode, cfg.tokens[0])
        results[mode] = {}
        for t in cfg.tokens:
            torch.manual_seed(1)
            x = torch.randn(t, cfg.hidden, dtype=dtype, device=dev)
            y = torch.randn(t, cfg.hidden, dtype=dtype, device=dev)
            run_cm = cm
            if mode == "on" and dev.type == "cuda":
                # the planner on a device capped at weights / cap_factor: does it stream, does the
                # plan fit, and what does it predict? Timed with that plan when it streams.
                capped, why = _capped(cfg, dev, t, cap, bw)
                planned[t] = (dict(planner_offloads=True, planned_gib=capped.plan.stages[0].memory_bytes / 2**30,
                                   predicted_ms=capped.plan.predicted["step_ms"]) if capped is not None
                              else dict(planner_offloads=False, why=why))
                run_cm = capped if capped is not None else cm
            try:
                results[mode][t] = _time_steps(run_cm, x, y, cfg, dev)
            except torch.OutOfMemoryError:
                results[mode][t] = (float("nan"), None)
            print(f"  offload={mode} tokens={t}: {results[mode][t][0] * 1e3:.1f} ms", file=sys.stderr)
            del x, y, run_cm
        del cm
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    crossover = None
    for t in cfg.tokens:
        (tr, pr), (to, po) = results["off"][t], results["on"][t]
        ratio = tr / to if to == to and tr == tr else float("nan")  # throughput ratio: offloaded / resident
        # the transfers a step needs at least: weights in twice (forward, backward), gradients out once
        # (the H2D figure is used for the way out too)
        transfer_s = 3 * weights / bw if bw else None
        rows.append(dict(tokens=t, resident_ms=tr * 1e3, offloaded_ms=to * 1e3, ratio=ratio,
                         resident_tok_s=t / tr, offloaded_tok_s=t / to,
                         resident_peak_gib=pr / 2**30 if pr is not None else None,
                         offloaded_peak_gib=po / 2**30 if po is not None else None,
                         offloaded_fits_cap=(po <= cap) if po is not None else None,
                         transfer_bound_ms=transfer_s * 1e3 if transfer_s else None, **planned.get(t, {})))
        # the crossover: from here on (every larger token count in the sweep) the ratio stays >= 0.8
        if ratio >= 0.8:
            crossover = t if crossover is None else crossover
        else:
            crossover = None
    return dict(config=dataclasses.asdict(cfg), device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
                torch=torch.__version__, weights_gib=weights / 2**30, cap_gib=cap / 2**30,
                h2d_gb_s=bw / 1e9 if bw else None, min_unit_bytes=offload_mod.DEFAULT_MIN_UNIT_BYTES,
                rows=rows, crossover_tokens=crossover)


def markdown(res: dict, command: str) -> str:
    c = res["config"]
    def f(v, fmt):
        return "-" if v is None else format(v, fmt)
    lines = [f"# Offload streaming: {c['layers']} x Linear({c['hidden']})+GELU, {c['dtype']}, {res['device']}", "",
             f"`{command}`", "",
             f"weights {res['weights_gib']:.2f} GiB, cap (weights / {c['cap_factor']}) {res['cap_gib']:.2f} GiB, "
             f"host->device {f(res['h2d_gb_s'], '.1f')} GB/s (pinned, one layer's weight); "
             f"median of {c['steps']} steps after {c['warmup']} warm-up; step = forward + backward.", "",
             "| tokens | resident ms | offloaded ms | offloaded/resident throughput | resident peak GiB | "
             "offloaded peak GiB | under cap | transfer bound ms |",
             "|---:|---:|---:|---:|---:|---:|:---:|---:|"]
    for r in res["rows"]:
        fits = "-" if r["offloaded_fits_cap"] is None else ("yes" if r["offloaded_fits_cap"] else "no")
        lines.append(f"| {r['tokens']} | {r['resident_ms']:.1f} | {r['offloaded_ms']:.1f} | {r['ratio']:.2f} | "
                     f"{f(r['resident_peak_gib'], '.2f')} | {f(r['offloaded_peak_gib'], '.2f')} | {fits} | "
                     f"{f(r['transfer_bound_ms'], '.1f')} |")
    x = res["crossover_tokens"]
    lines += ["", f"crossover (ratio >= 0.8): {'none in the sweep' if x is None else f'{x} tokens per microbatch'}", ""]
    if any("planner_offloads" in r for r in res["rows"]):
        lines += [f"The planner on the same GPU capped at {res['cap_gib']:.2f} GiB (offload='auto', Adam, the measured "
                  "host link); the offloaded column above ran that plan where it streams:", "",
                  "| tokens | planner streams | planned GiB | measured peak GiB | predicted ms | measured ms | note |",
                  "|---:|:---:|---:|---:|---:|---:|---|"]
        for r in res["rows"]:
            if r.get("planner_offloads"):
                lines.append(f"| {r['tokens']} | yes | {r['planned_gib']:.2f} | {f(r['offloaded_peak_gib'], '.2f')} | "
                             f"{r['predicted_ms']:.1f} | {r['offloaded_ms']:.1f} | |")
            elif "planner_offloads" in r:
                lines.append(f"| {r['tokens']} | no | - | - | - | - | {r['why'][:120]} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int)
    ap.add_argument("--layers", type=int)
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--tokens", type=lambda s: tuple(int(v) for v in s.split(",")), help="comma-separated sweep")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--cpu", action="store_true", help="tiny sizes on the CPU: checks the script end to end")
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    cfg = Config(dtype=args.dtype, steps=args.steps, warmup=args.warmup, cpu=args.cpu)
    if args.cpu:
        cfg = dataclasses.replace(cfg, hidden=64, layers=4, tokens=(32, 128), steps=3, warmup=1)
        offload_mod.DEFAULT_MIN_UNIT_BYTES = 0  # one unit per layer even at these sizes
    elif not torch.cuda.is_available():
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
    stem = "offload_cpu_smoke" if cfg.cpu else f"offload_{cfg.dtype}"
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2))
    md = markdown(res, command)
    (out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
