"""Does the simulator's activation memory match what a GPU really allocates?

GPT-2 on ["cuda:0", "cpu"]: one stage runs on the GPU, the other on the CPU, so
`torch.cuda.max_memory_allocated` during a step measures the GPU stage alone. Its peak above
the memory held before the step (parameters, gradients) is compared with the simulator's
activation peak for that device, for GPipe (m microbatches alive) and 1F1B (at most p - s).

    PYTHONPATH=. python3 benchmarks/gpu_memory.py        # on a machine with CUDA; writes $OUT/gpu_memory.json
"""

from __future__ import annotations

import json
import os
import sys

import torch
from torch import nn

import fxpipe


def loss_fn(out, t):
    return nn.functional.cross_entropy(out.logits.flatten(0, 1), t.flatten())


def measure(schedule: str, m: int) -> dict:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=8, n_embd=512, n_head=8, vocab_size=2048, n_positions=512,
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = GPT2LMHeadModel(cfg)
    x = torch.randint(0, 2048, (16, 256))
    cm = fxpipe.compile(model, ["cuda:0", "cpu"], (x,), microbatches=m, schedule=schedule)
    cm.step(x, target=x, loss_fn=loss_fn)  # grads now exist: they are not activations
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(0)
    torch.cuda.reset_peak_memory_stats(0)
    cm.step(x, target=x, loss_fn=loss_fn)
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated(0) - base
    cm.step(x, target=x, loss_fn=loss_fn, measure_memory=True)
    gpu = [d.name for d in cm.plan.cluster.devices].index("cuda:0")  # placement may reorder devices
    saved = cm.last_memory[gpu]
    predicted = fxpipe.simulate(cm.plan).peak_memory[gpu]
    stage = next(s for s in cm.plan.stages if s.device == gpu)
    return {"schedule": schedule, "microbatches": m, "gpu_stage": stage.index, "gpu_units": list(stage.units),
            "cuda_peak_above_base_bytes": measured, "saved_tensor_peak_bytes": saved, "predicted_bytes": predicted,
            "predicted_over_cuda": predicted / measured, "predicted_over_saved": predicted / saved}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    rows = [measure("gpipe", 4), measure("1f1b", 4), measure("gpipe", 8), measure("1f1b", 8)]
    for r in rows:
        print(json.dumps(r))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_memory.json"), "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
