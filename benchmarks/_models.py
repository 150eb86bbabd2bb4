"""Models the benchmarks share (one definition, so every benchmark times the same thing)."""

from __future__ import annotations

import torch
from torch import nn


def mlp_blocks(blocks: int, hidden: int, ffn: int) -> nn.Sequential:
    """`blocks` x Linear(hidden, ffn)-GELU-Linear(ffn, hidden), seeded so runs compare."""
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Sequential(nn.Linear(hidden, ffn), nn.GELU(), nn.Linear(ffn, hidden))
                           for _ in range(blocks)])
