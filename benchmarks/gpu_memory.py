"""Does the simulator's memory match what a GPU really allocates?

GPT-2 on ["cuda:0", "cpu"]: one stage runs on the GPU, the other on the CPU, so
`torch.cuda.max_memory_allocated` during a step measures the GPU stage alone. Its peak above
the memory held before the step (parameters, gradients), and the peak of the tensors the GPU
stage's ops create (parameter gradients excluded, counted as on CPU by
`measured_vs_simulated.peak_allocated`), are compared with the simulator's
`peak_allocated` for that device (activations + the backward's transient gradient buffers +
what a zero-bubble BI keeps for BW), and the bytes autograd saved with `peak_memory`, for
GPipe (m microbatches alive), 1F1B (at most p - s) and ZB-H1. Each step starts from zeroed
gradients, as a training loop does: the step's new `.grad` tensors are static memory, so their
bytes (the GPU stage's trainable parameters) are taken off the measured peak.

    PYTHONPATH=. python3 benchmarks/gpu_memory.py        # on a machine with CUDA; writes $OUT/gpu_memory.json
    PYTHONPATH=. python3 benchmarks/gpu_memory.py --cpu  # no GPU: the same rows with the CPU-side measurement only
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

import fxpipe

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measured_vs_simulated import peak_allocated  # noqa: E402  (CPU allocations, per device)

TARGET = 0.15


def loss_fn(out, t):
    return nn.functional.cross_entropy(out.logits.flatten(0, 1), t.flatten())


def measure(schedule: str, m: int, gpu: bool = True) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=8, n_embd=512, n_head=8, vocab_size=2048, n_positions=512,
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = GPT2LMHeadModel(cfg)
    x = torch.randint(0, 2048, (16, 256))
    cm = fxpipe.compile(model, ["cuda:0", "cpu"] if gpu else ["cpu", "cpu"], (x,), microbatches=m, schedule=schedule)
    cm.step(x, target=x, loss_fn=loss_fn)  # warm-up (kernels, workspaces)
    sim = fxpipe.simulate(cm.plan)
    names = [d.name for d in cm.plan.cluster.devices]
    dev = names.index("cuda:0") if gpu else 0  # placement may reorder devices
    stage = next(s for s in cm.plan.stages if s.device == dev)
    row = {"schedule": schedule, "microbatches": m, "device": names[dev], "gpu_stage": stage.index,
           "gpu_units": list(stage.units), "predicted_alloc_bytes": sim.peak_allocated[dev],
           "predicted_saved_bytes": sim.peak_memory[dev]}
    if gpu:
        cm.zero_grad()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(0)
        torch.cuda.reset_peak_memory_stats(0)
        cm.step(x, target=x, loss_fn=loss_fn)
        torch.cuda.synchronize()
        # the step's parameter gradients on the GPU (and a tied weight's replica) are static memory
        grads = sum(q.grad.numel() * q.grad.element_size() for q in cm.model.parameters()
                    if q.grad is not None and q.grad.is_cuda)
        grads += sum(r.numel() * r.element_size() for _, r in cm._replicas if r.is_cuda and r.requires_grad)
        raw = torch.cuda.max_memory_allocated(0) - base
        # the step's gradients appear during it, so taking all of them off the allocator's
        # peak undercounts when the peak comes before the last one; the tensor count below
        # moves each gradient to static memory the moment it lands in .grad (the CPU check's
        # method), and is the figure compared
        tensors = peak_allocated(cm, {"input_ids": x}, x, loss_fn, device_type="cuda")[dev]
        row.update(cuda_peak_above_base_bytes=raw, cuda_param_grad_bytes=grads,
                   cuda_peak_minus_grads_bytes=raw - grads, cuda_tensor_peak_bytes=tensors,
                   predicted_over_cuda=row["predicted_alloc_bytes"] / tensors,
                   predicted_over_cuda_minus_grads=row["predicted_alloc_bytes"] / (raw - grads))
    else:
        measured = peak_allocated(cm, {"input_ids": x}, x, loss_fn)[dev]
        row.update(cpu_peak_alloc_bytes=measured, predicted_over_cpu=row["predicted_alloc_bytes"] / measured)
    cm.zero_grad()
    cm.step(x, target=x, loss_fn=loss_fn, measure_memory=True)
    row.update(saved_tensor_peak_bytes=cm.last_memory[dev],
               predicted_over_saved=row["predicted_saved_bytes"] / cm.last_memory[dev])
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu", action="store_true", help="two CPU workers, CPU allocations (no GPU needed)")
    a = ap.parse_args()
    gpu = not a.cpu
    if gpu and not torch.cuda.is_available():
        print("no CUDA device: nothing to measure (--cpu runs the CPU-side check)")
        return 0
    runs = [("gpipe", 4), ("1f1b", 4), ("zb-h1", 4), ("gpipe", 8), ("1f1b", 8), ("zb-h1", 8)]
    rows = [measure(s, m, gpu) for s, m in runs]
    ratio = "predicted_over_cuda" if gpu else "predicted_over_cpu"  # simulated / measured tensor peak
    for r in rows:
        print(json.dumps(r))
    print(f"{'schedule':8} {'m':>2} {'alloc ratio':>11} {'saved ratio':>11}")
    for r in rows:
        ok = "" if abs(r[ratio] - 1) <= TARGET else "  outside 15%"
        print(f"{r['schedule']:8} {r['microbatches']:>2} {r[ratio]:>11.3f} {r['predicted_over_saved']:>11.3f}{ok}")
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_memory.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
