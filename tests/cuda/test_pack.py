"""The boundary pack kernel (`fxpipe/cuda/pack.py`) against one copy per tensor.

The CPU test runs everywhere (the fallback); the CUDA tests skip without CUDA or CuPy.
"""

from __future__ import annotations

import pytest
import torch

from fxpipe.cuda import kernels
from fxpipe.cuda.pack import SLOTS, pack_into

cuda = pytest.mark.skipif(not kernels.available(), reason="needs a CUDA device and CuPy")


def _parts(device, n, aligned=True):
    """n tensors of mixed dtypes and odd sizes at increasing offsets (16-aligned or not)."""
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.uint8, torch.float16]
    parts, off = [], 3 if not aligned else 0
    for k in range(n):
        dt = dtypes[k % len(dtypes)]
        numel = 1 + 37 * k + (4096 if k % 3 == 0 else 0)
        t = (torch.randn(numel, device=device) * 50).to(dt)
        if k % 4 == 1:
            t = torch.randn(numel, 2, device=device).to(dt)[:, 0]  # non-contiguous source
        parts.append((t, off))
        nb = t.numel() * t.element_size()
        off = off + nb + (0 if not aligned else (-nb) % 16) + (5 if not aligned else 0)
    return parts, off


def _reference(parts, nbytes, device):
    buf = torch.zeros(nbytes, dtype=torch.uint8, device=device)
    for t, off in parts:
        nb = t.numel() * t.element_size()
        buf[off:off + nb] = t.contiguous().view(-1).view(torch.uint8)
    return buf


def test_pack_into_cpu_fallback_matches_per_tensor_copies():
    parts, nbytes = _parts("cpu", 5)
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    pack_into(buf, parts)
    assert torch.equal(buf, _reference(parts, nbytes, "cpu"))
    with pytest.raises(ValueError, match="overflow"):
        pack_into(torch.zeros(4, dtype=torch.uint8), [(torch.ones(2), 0)])


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("n", [2, SLOTS, SLOTS + 3])
@pytest.mark.parametrize("aligned", [True, False])
def test_pack_kernel_matches_per_tensor_copies(n, aligned):
    parts, nbytes = _parts("cuda", n, aligned)
    buf = torch.zeros(nbytes, dtype=torch.uint8, device="cuda")
    before = kernels.TUNING  # the kernel does not depend on the elementwise tuning
    pack_into(buf, parts)
    assert torch.equal(buf, _reference(parts, nbytes, "cuda"))
    assert kernels.TUNING is before
    from fxpipe.cuda import pack

    assert pack._kernel.cache_info().currsize == 1  # the CuPy kernel ran, not the fallback


@cuda
@pytest.mark.cuda
def test_boundary_layout_pack_roundtrip_on_cuda():
    from fxpipe.runtime.distributed import BoundaryLayout

    vals = [torch.randn(4, 8, device="cuda"), (torch.arange(5, device="cuda"), 3), torch.ones(3, device="cuda",
                                                                                                 dtype=torch.bfloat16)]
    lay = BoundaryLayout(vals, "test boundary")
    buf = lay.pack(vals, torch.device("cuda"))
    out = lay.unpack(buf)
    assert torch.equal(out[0], vals[0]) and torch.equal(out[1][0], vals[1][0]) and out[1][1] == 3
    assert torch.equal(out[2], vals[2])
