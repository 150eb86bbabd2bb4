"""Does the local runtime turn 2 CPU cores into a faster training step?

8 blocks of Linear(1024,4096)-GELU-Linear(4096,1024), batch 256, 8 microbatches, 1F1B on
2 CPU workers, against the same model in one process with one thread (and, for reference,
with all cores). Reports the speedup and the gap to fxpipe's own predicted step time.

    python3 benchmarks/runtime_cpu.py            # writes benchmarks/results/runtime_cpu.{json,md}
    python3 benchmarks/runtime_cpu.py --quick    # smaller model, for a smoke run
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxpipe  # noqa: E402
from benchmarks._models import mlp_blocks  # noqa: E402


@dataclass
class Config:
    blocks: int = 8
    hidden: int = 1024
    ffn: int = 4096
    batch: int = 256
    microbatches: int = 8
    schedule: str = "1f1b"
    devices: int = 2
    steps: int = 3
    warmup: int = 1


def make_model(c: Config) -> nn.Module:
    return mlp_blocks(c.blocks, c.hidden, c.ffn)


def timed(fn, c: Config) -> float:
    for _ in range(c.warmup):
        fn()
    times = []
    for _ in range(c.steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(c: Config) -> dict:
    x = torch.randn(c.batch, c.hidden)
    t = torch.randn(c.batch, c.hidden)
    loss_fn = nn.functional.mse_loss
    model = make_model(c)
    eager_model = copy.deepcopy(model)

    def eager_step():
        loss_fn(eager_model(x), t).backward()

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    eager_1t = timed(eager_step, c)
    torch.set_num_threads(os.cpu_count() or 1)
    eager_all = timed(eager_step, c)
    torch.set_num_threads(prev)

    cm = fxpipe.compile(model, ["cpu"] * c.devices, (x,), microbatches=c.microbatches, schedule=c.schedule)
    fx_step = timed(lambda: cm.step(x, target=t, loss_fn=loss_fn), c)
    predicted = cm.plan.predicted["step_ms"] / 1e3
    return {
        "config": asdict(c),
        "cores": os.cpu_count(),
        "eager_1thread_s": eager_1t,
        "eager_all_cores_s": eager_all,
        "fxpipe_s": fx_step,
        "speedup_vs_1thread": eager_1t / fx_step,
        "speedup_vs_all_cores": eager_all / fx_step,
        "predicted_s": predicted,
        "measured_over_predicted": fx_step / predicted,
        "plan": cm.plan.summary(),
    }


def markdown(r: dict) -> str:
    c = r["config"]
    return "\n".join([
        f"## runtime_cpu: {c['blocks']} blocks {c['hidden']}-{c['ffn']}, batch {c['batch']}, "
        f"{c['microbatches']} microbatches, {c['schedule']}, {c['devices']} CPU workers, {r['cores']} cores",
        "",
        "| what | step (s) | fxpipe speedup |",
        "|---|---:|---:|",
        f"| eager, 1 thread | {r['eager_1thread_s']:.3f} | {r['speedup_vs_1thread']:.2f}x |",
        f"| eager, {r['cores']} threads | {r['eager_all_cores_s']:.3f} | {r['speedup_vs_all_cores']:.2f}x |",
        f"| fxpipe | {r['fxpipe_s']:.3f} | 1.00x |",
        f"| fxpipe predicted | {r['predicted_s']:.3f} | measured/predicted {r['measured_over_predicted']:.2f} |",
        "",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small model, one step: a smoke run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"), help="directory for JSON and markdown")
    args = ap.parse_args()
    c = Config(blocks=4, hidden=256, ffn=1024, batch=64, steps=1) if args.quick else Config()
    r = run(c)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "runtime_cpu.json").write_text(json.dumps(r, indent=1))
    (out / "runtime_cpu.md").write_text(markdown(r))
    print(r["plan"])
    print(markdown(r))


if __name__ == "__main__":
    main()
