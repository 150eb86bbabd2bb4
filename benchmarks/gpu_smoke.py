"""GPU smoke check: fxpipe on CUDA devices equals eager (outputs, loss, every gradient).

Run on a machine with CUDA:  PYTHONPATH=. python3 benchmarks/gpu_smoke.py
Covers two workers on one GPU (separate streams, event-ordered hand-over) and a CUDA+CPU mix.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time

import torch
from torch import nn

import fxpipe


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(n_layer=4, n_embd=256, n_head=4, vocab_size=1024, n_positions=64,
                     resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    return GPT2LMHeadModel(cfg)


def _loss(out, t):
    return nn.functional.cross_entropy(out.logits.flatten(0, 1), t.flatten())


def check(devices: list[str], schedule: str) -> dict:
    torch.manual_seed(0)
    model = _gpt2()
    ref = copy.deepcopy(model).to(devices[0])
    x = torch.randint(0, 1024, (8, 32))
    cm = fxpipe.compile(model, devices, (x,), microbatches=4, schedule=schedule)
    y = cm(x)
    fwd = (y.logits.to("cpu") - ref(x.to(devices[0])).logits.to("cpu")).abs().max().item()
    loss = cm.step(x, target=x, loss_fn=_loss)
    rl = _loss(ref(x.to(devices[0])), x.to(devices[0]))
    rl.backward()
    worst = 0.0
    for (n, p), (_, q) in zip(model.named_parameters(), ref.named_parameters()):
        worst = max(worst, ((p.grad.to("cpu") - q.grad.to("cpu")).abs().max() / (q.grad.abs().max().to("cpu") + 1e-12)).item())
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(5):
        cm.step(x, target=x, loss_fn=_loss)
    torch.cuda.synchronize()
    step = (time.perf_counter() - t0) / 5
    return {"devices": devices, "schedule": schedule, "fwd_max_abs_diff": fwd, "loss": loss.item(), "eager_loss": rl.item(),
            "grad_max_rel_diff": worst, "step_s": step, "ok": fwd < 1e-3 and worst < 1e-3 and abs(loss.item() - rl.item()) < 1e-4}


def main() -> int:
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check")
        return 0
    results = [check(["cuda:0", "cuda:0"], "1f1b"), check(["cuda:0", "cuda:0", "cuda:0"], "gpipe"),
               check(["cuda:0", "cpu"], "1f1b")]
    for r in results:
        print(json.dumps(r))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "gpu_smoke.json"), "w") as f:
            json.dump(results, f, indent=1)
    return 0 if all(r["ok"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
