"""`fxpipe demo`: compile a small GPT across devices, check it against eager, train a few steps.

The self-checking tour a new user runs first; exit status 1 when outputs, loss or gradients
differ from the untouched model.
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

from fxpipe.cli_inputs import CliError, parse_devices
from fxpipe.cli_report import timeline_text

__all__: list[str] = []


def _cmd_demo(a: argparse.Namespace) -> int:
    import torch

    import fxpipe
    from fxpipe.models import demo_gpt

    devices = parse_devices(a.devices)
    if a.steps < 0 or a.microbatches < 1:
        raise CliError("--steps must be >= 0 and --microbatches >= 1")
    torch.manual_seed(0)
    try:
        model, what = demo_gpt(a.model)
    except ImportError:
        raise CliError("--model gpt2 needs transformers: pip install 'fxpipe[hf]'") from None
    model.train()
    ref = copy.deepcopy(model)  # untouched eager copy to check against
    batch = max(8, a.microbatches)
    x = torch.randint(0, 512, (batch, 32))
    target = torch.roll(x, -1, dims=1)  # next-token targets

    def logits(out: Any) -> torch.Tensor:
        return out.logits if hasattr(out, "logits") else out

    def loss_fn(out: Any, t: torch.Tensor) -> torch.Tensor:
        lg = logits(out)
        return torch.nn.functional.cross_entropy(lg.flatten(0, 1).float(), t.to(lg.device).flatten())

    print(f"fxpipe demo: {what} on {len(devices)} devices ({', '.join(devices)}), batch {tuple(x.shape)}, "
          f"{a.microbatches} microbatches, schedule {a.schedule}")
    cm = fxpipe.compile(model, devices, (x,), microbatches=a.microbatches, schedule=a.schedule,
                        optimizer="adam", progress=True)
    print(cm.plan.summary())

    print("\ncheck against the untouched model:")
    with torch.no_grad():
        fwd = (logits(cm(x)).float().cpu() - logits(ref(x)).float()).abs().max().item()
    loss = cm.step(x, target=target, loss_fn=loss_fn).float().cpu()
    ref_loss = loss_fn(ref(x), target)
    ref_loss.backward()
    grads = dict(ref.named_parameters())
    gdiff, worst, ok = 0.0, "-", True
    for name, p in model.named_parameters():
        r = grads[name].grad
        if (p.grad is None) != (r is None):
            ok, worst = False, f"{name} (gradient missing on one side)"
            continue
        if r is None:
            continue
        g = p.grad.float().cpu()
        d = (g - r).abs().max().item()
        if d > gdiff:
            gdiff, worst = d, name
        ok &= torch.allclose(g, r, rtol=1e-4, atol=1e-5)
    ldiff = abs(loss.item() - ref_loss.item())
    ok &= fwd <= 1e-4 and ldiff <= 1e-4
    print(f"  forward  max |cm(x) - model(x)|     = {fwd:.3g}")
    print(f"  loss     |step loss - eager loss|   = {ldiff:.3g} ({loss.item():.5f} vs {ref_loss.item():.5f})")
    print(f"  grads    max |grad - eager grad|    = {gdiff:.3g} over {len(grads)} parameters (worst: {worst})")
    print(f"  {'PASS' if ok else 'FAIL'}")

    if a.steps:
        print(f"\ntraining {a.steps} AdamW steps on this batch:")
        opt = torch.optim.AdamW(cm.parameters(), lr=3e-3)
        for i in range(a.steps):
            cm.zero_grad()
            t0 = time.perf_counter()
            step_loss = cm.step(x, target=target, loss_fn=loss_fn)
            opt.step()
            print(f"  step {i + 1}: loss {step_loss.item():.4f} ({(time.perf_counter() - t0) * 1e3:.0f} ms)")

    print("\n" + timeline_text(cm.plan))
    code = cm.code(0).rstrip("\n").splitlines()
    keep = 20
    print("\ngenerated program of device 0:")
    print("\n".join(code[:keep]))
    if len(code) > keep:
        print(f"    # ... {len(code) - keep} more lines; see all: cm.code(0), or fxpipe inspect PLAN --format code")
    return 0 if ok else 1
