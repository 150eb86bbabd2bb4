"""Make `import fxpipe` work when pytest is run as `pytest` (not only `python -m pytest`)."""

from __future__ import annotations

import sys
from pathlib import Path

_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import pytest
import torch
from hypothesis import settings

# Deterministic property tests with no per-example deadline (CI machines are slow and shared).
settings.register_profile("ci", derandomize=True, deadline=None, max_examples=30)
settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed_torch():
    """Every test starts from the same RNG state, so random weights and inputs are reproducible."""
    torch.manual_seed(0)
    yield
