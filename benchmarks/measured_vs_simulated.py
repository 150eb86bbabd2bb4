"""How close is fxpipe's prediction to a real run: step time and peak activation memory?

On 2 CPU workers, for an MLP (8 blocks Linear(512,2048)-GELU-Linear(2048,512), batch 128,
8 microbatches) and GPT-2 small (config defaults, random weights, dropout on), for 1F1B and
ZB-H1: the measured step (median of `steps` after `warmup`) against `fxpipe.simulate(plan)`
with roofline costs and with profiled costs (`profile=True`), and the measured peak
activation memory per device (`step(..., trace=...)`: bytes autograd saved) against the
simulated one. Targets: step within 20% (profiled), memory within 15%.

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

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fxpipe  # noqa: E402

OUT = Path(__file__).resolve().parent / "results"


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


def measure(name: str, schedule: str, costs: str, c: Config, trace_dir: Path) -> dict:
    model, inputs, target, loss_fn, m = make(name, c)
    t0 = time.perf_counter()
    cm = fxpipe.compile(model, ["cpu"] * c.devices, inputs, microbatches=m, schedule=schedule,
                        profile=costs == "profiled")
    compile_s = time.perf_counter() - t0
    for _ in range(c.warmup):
        cm.step(**inputs, target=target, loss_fn=loss_fn)
    times = []
    for _ in range(c.steps):
        t0 = time.perf_counter()
        cm.step(**inputs, target=target, loss_fn=loss_fn)
        times.append(time.perf_counter() - t0)
    stem = f"{name}_{schedule}_{costs}"
    cm.step(**inputs, target=target, loss_fn=loss_fn, trace=str(trace_dir / f"{stem}_measured.trace.json"))
    sim = fxpipe.simulate(cm.plan)
    (trace_dir / f"{stem}_predicted.trace.json").write_text(json.dumps(sim.to_chrome_trace()))
    measured = statistics.median(times)
    mem_meas, mem_sim = list(cm.last_memory), list(sim.peak_memory)
    return {
        "model": name, "schedule": schedule, "costs": costs, "compile_s": round(compile_s, 2),
        "stages": [list(s.units) for s in cm.plan.stages],
        "step_measured_s": measured, "step_times_s": times, "step_recorded_s": cm.last_timeline.step_time,
        "step_predicted_s": sim.step_time, "step_error": sim.step_time / measured - 1,
        "peak_act_measured_bytes": mem_meas, "peak_act_predicted_bytes": mem_sim,
        "memory_error": [s / mm - 1 if mm else 0.0 for s, mm in zip(mem_sim, mem_meas)],
    }


def table(rows: list[dict], c: Config) -> str:
    mib = 2**20
    out = ["| model | schedule | costs | measured step s | predicted s | error | peak act. measured MiB | predicted MiB | error |",
           "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ok_t = "" if r["costs"] == "roofline" or abs(r["step_error"]) <= c.step_target else " ✗"
        ok_m = "" if all(abs(e) <= c.memory_target for e in r["memory_error"]) else " ✗"
        out.append(f"| {r['model']} | {r['schedule']} | {r['costs']} | {r['step_measured_s']:.3f} | "
                   f"{r['step_predicted_s']:.3f} | {100 * r['step_error']:+.0f}%{ok_t} | "
                   f"{' / '.join(f'{b / mib:.1f}' for b in r['peak_act_measured_bytes'])} | "
                   f"{' / '.join(f'{b / mib:.1f}' for b in r['peak_act_predicted_bytes'])} | "
                   f"{' / '.join(f'{100 * e:+.1f}%' for e in r['memory_error'])}{ok_m} |")
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
          f"Step: median of {c.steps} after {c.warmup} warm-up; target within {100 * c.step_target:.0f}% with "
          f"profiled costs. Peak activation memory per device (d0 / d1): bytes autograd saved for backward, "
          f"target within {100 * c.memory_target:.0f}%. Error = predicted / measured - 1.", "",
          table(rows, c), "", f"Environment: {env} (load average when written; timings are only as good as the "
          "machine was quiet)"]
    (OUT / f"measured_vs_simulated{suffix}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
