"""Train a small model as a pipeline with one process per stage.

    python3 -m torch.distributed.run --standalone --nproc_per_node=2 examples/train_distributed.py

Every rank runs this same script. Each one plans the model the same way, builds only the
stages placed on it, and takes part in every `step`. `step` returns the loss on every rank.
The optimizer gets `cm.parameters()`, which are this rank's parameters only. Optional
arguments: the number of steps, and a folder to save a sharded checkpoint to at the end.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import fxpipe


def make_model_and_data(seed: int = 0) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The same model and batch on every rank (and in the eager reference of the test)."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(),
                          nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 4))
    x = torch.randn(32, 16)
    y = torch.randn(32, 4)
    return model, x, y


def main(steps: int = 3, checkpoint: str | None = None) -> None:
    # torchrun sets WORLD_SIZE; run without it, compile says how to launch (for 2 ranks)
    world = int(os.environ.get("WORLD_SIZE", "2"))
    model, x, y = make_model_and_data()
    cm = fxpipe.compile(model, ["cpu"] * world, (x,), microbatches=4, backend="distributed", timeout=60)
    opt = torch.optim.SGD(cm.parameters(), lr=0.1)
    for i in range(steps):
        opt.zero_grad()
        loss = cm.step(x, target=y, loss_fn=F.mse_loss)
        opt.step()
        # one write per line: both ranks share the terminal (or pipe) under torchrun
        sys.stdout.write(f"rank {cm.rank} step {i} loss {loss.item():.9e}\n")
        sys.stdout.flush()
    if checkpoint:
        cm.save_checkpoint(checkpoint)  # every rank writes its own file
    dist.destroy_process_group()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 3, sys.argv[2] if len(sys.argv) > 2 else None)
