"""Overlap of boundary transfers with compute on one GPU (issue: CUDA layer, "Overlap").

A two-stage pipeline's sender side on one GPU: each microbatch is computed (a chain of
matmul + tanh on the compute stream), then its output crosses a link. The link is emulated by
the route a PCIe hop between two GPUs takes, device -> pinned host -> device, through
`fxpipe.runtime.transfer.Channel(via_host=True)`: its own copy stream, started by an event on
the compute stream (no host synchronisation). Measured, all with CUDA events, median of
repeats:

* t_compute: the m computes alone;
* t_comm: the m transfers alone;
* t_measured: compute k+1 while microbatch k is transferred (the channel);
* t_serial: the same transfers on the compute stream (what a runtime without copy streams does).

overlap efficiency = (t_compute + t_comm - t_measured) / min(t_compute, t_comm); target >= 0.85.
`--hidden` and `--layers` set the compute per microbatch, `--rows` the bytes per transfer.

    PYTHONPATH=. python3 benchmarks/overlap.py            # GPU machine; writes results/overlap.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

from fxpipe.runtime.transfer import Channel


def _time(fn, repeats: int = 7, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()  # also waits for the copy streams (they end before fn returns' sync)
        ts.append(start.elapsed_time(end) / 1e3)
    return statistics.median(ts)


def run(rows: int, hidden: int, layers: int, m: int) -> dict:
    dev = torch.device("cuda", torch.cuda.current_device())
    xs = [torch.randn(rows, hidden, device=dev) for _ in range(m)]
    w = torch.randn(hidden, hidden, device=dev) / hidden ** 0.5
    ch = Channel(dev, dev, via_host=True)
    outs = [x.clone() for x in xs]

    def compute(k: int) -> torch.Tensor:
        y = xs[k]
        for _ in range(layers):
            y = torch.tanh(y @ w)
        return y

    def compute_only() -> None:
        for k in range(m):
            compute(k)

    def comm_only() -> None:
        ready = None
        for k in range(m):
            _, ready = ch.send([outs[k]])
        torch.cuda.current_stream().wait_event(ready)  # the end event on the compute stream sees the copies

    def overlapped() -> None:
        ready = None
        for k in range(m):
            _, ready = ch.send([compute(k)])
        torch.cuda.current_stream().wait_event(ready)

    def serial() -> None:
        for k in range(m):
            host = torch.empty(rows, hidden, pin_memory=True)
            host.copy_(compute(k), non_blocking=True)
            host.to(dev, non_blocking=True)

    t_compute, t_comm = _time(compute_only), _time(comm_only)
    t_measured, t_serial = _time(overlapped), _time(serial)
    eff = (t_compute + t_comm - t_measured) / min(t_compute, t_comm)
    return {"rows": rows, "hidden": hidden, "layers": layers, "microbatches": m,
            "bytes_per_transfer": rows * hidden * 4, "t_compute_s": t_compute, "t_comm_s": t_comm,
            "t_measured_s": t_measured, "t_serial_s": t_serial, "overlap_efficiency": eff,
            "serial_efficiency": (t_compute + t_comm - t_serial) / min(t_compute, t_comm)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--rows", type=int, default=8192)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--microbatches", type=int, default=8)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        print("overlap.py needs a CUDA device (it measures copy streams against compute)", file=sys.stderr)
        return 2
    results = [run(a.rows, a.hidden, L, a.microbatches) for L in a.layers]
    env = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "overlap.json").write_text(json.dumps({"env": env, "results": results}, indent=2))
    lines = ["# Overlap of boundary transfers with compute", "",
             f"{env['device']}, torch {env['torch']}. `PYTHONPATH=. python3 benchmarks/overlap.py`. Transfer = device "
             "-> pinned host -> device on the channel's copy stream; efficiency = (t_compute + t_comm - t_measured) / "
             "min(t_compute, t_comm), target >= 0.85; serial = the same copies on the compute stream.", "",
             "| layers | MB per transfer | t_compute ms | t_comm ms | t_measured ms | efficiency | t_serial ms | serial eff. |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['layers']} | {r['bytes_per_transfer'] / 2**20:.0f} | {r['t_compute_s'] * 1e3:.2f} | "
                     f"{r['t_comm_s'] * 1e3:.2f} | {r['t_measured_s'] * 1e3:.2f} | {r['overlap_efficiency']:.2f} | "
                     f"{r['t_serial_s'] * 1e3:.2f} | {r['serial_efficiency']:.2f} |")
    (out / "overlap.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
